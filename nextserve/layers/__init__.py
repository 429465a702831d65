"""Building blocks shared by the model: rotary embedding, tensor-parallel linears."""
