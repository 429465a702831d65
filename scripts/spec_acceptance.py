"""Speculative decoding on the built-in model (CPU): exactness, acceptance per draft position, and wall time of
fixed k = 1..3 and of the adaptive policy against plain decoding. Used for docs/performance.md."""

import time

from nextserve import LLM, SamplingParams

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "KING HENRY:", "First Citizen:\nBefore we proceed"] * 4
PARAMS = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
KW = dict(disable_tqdm=True, device="cpu", cpu_cache_bytes=256 << 20)


def timed(llm):
    llm.generate(PROMPTS, PARAMS)  # warm-up (and, for the adaptive policy, its measurements)
    t = time.perf_counter()
    out = llm.generate(PROMPTS, PARAMS)
    return [o.outputs[0].token_ids for o in out], time.perf_counter() - t


def main():
    ref, t_plain = timed(LLM(**KW))
    print(f"plain: {t_plain:.2f} s")
    for k, adaptive in ((1, False), (2, False), (3, False), (3, True)):
        llm = LLM(**KW, speculative_algorithm="NEXTN", speculative_num_steps=k, speculative_adaptive=adaptive)
        out, t = timed(llm)
        st = llm.engine.stats()
        acc = [round(st.get(f"spec_acceptance_rate_pos{i}", 0.0), 2) for i in range(k)]
        print(
            f"k={k} adaptive={adaptive}: identical={out == ref} acceptance/position={acc} "
            f"mean acceptance length={st['spec_mean_acceptance_length']:.2f} "
            f"drafts chosen last={st['spec_num_draft_tokens_chosen']} time={t:.2f} s"
        )


if __name__ == "__main__":
    main()
