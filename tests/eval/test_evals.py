"""End-to-end GSM8K and MMLU evaluations against the fake OpenAI server. Its answers are scripted per
question, so the exact accuracy, invalid rate and per-subject scores the tools report can be checked."""

import json
import re
from pathlib import Path

import pytest

from nextserve.eval import gsm8k, mmlu
from nextserve.eval.client import Completion, EvalItem, score, select
from tests.fake_openai_server import FakeOpenAIServer, FakeServerOptions

# CI keeps the real data sets beside the repository (repo root = parent of tests/).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# question -> (reference answer field, scripted reply). Five replies are right in different shapes, one is
# wrong and one holds no number.
GSM8K_SCRIPT = {
    "How many apples, q0?": ("3 + 4 = 7\n#### 7", "3 + 4 = <<3+4=7>>7 apples.\n#### 7"),
    "How many dollars, q1?": ("#### 1234", "Each costs 617, so 2 * 617 = 1,234. The answer is $1,234.00."),
    "How many hours, q2?": ("#### 2.5", "Half of 5 is \\boxed{2.50}"),
    # Right only if the tool sends the "Question:" stop string: the server cuts the reply there.
    "How many cats, q3?": ("#### 42", "The answer is 42.\n\nQuestion: bogus?\nAnswer: The answer is 7."),
    "How many dogs, q4?": ("#### 12", "6 + 7 = 13\n#### 13"),
    "How many birds, q5?": ("#### 9", "I do not know."),
    "How cold, q6?": ("#### -3", "It drops 5 degrees from 2, so it is -3 degrees"),
}


def request_for(server: FakeOpenAIServer, text: str) -> dict:
    """The body of the request whose last prompt line or message mentions `text` (arrival order varies)."""
    for body in server.requests:
        last = body["prompt"].rsplit("\n\n", 1)[-1] if "prompt" in body else body["messages"][-1]["content"]
        if text in last:
            return body
    raise AssertionError(f"no request asked {text!r}")


def last_question(prompt: str) -> str:
    """The question the prompt asks last (completions text, or chat contents joined by the fake server)."""
    return re.findall(r"Question: (.*)", prompt)[-1].strip()


def gsm8k_responder(prompt: str) -> str:
    return GSM8K_SCRIPT[last_question(prompt)][1]


@pytest.fixture
def gsm8k_data(tmp_path):
    train = [{"question": f"Train question {i}?", "answer": f"It is {i}.\n#### {i}"} for i in range(6)]
    test = [{"question": q, "answer": answer} for q, (answer, _) in GSM8K_SCRIPT.items()]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    return tmp_path / "test.jsonl"


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_gsm8k_end_to_end(gsm8k_data, tmp_path, api, capsys):
    out = tmp_path / "gsm8k.json"
    with FakeOpenAIServer(FakeServerOptions(responder=gsm8k_responder)) as server:
        argv = ["--base-url", server.url, "--data", str(gsm8k_data), "--api", api, "--parallel", "3"]
        rc = gsm8k.main([*argv, "--output-json", str(out), "--disable-tqdm"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == "fake-model"  # taken from GET /v1/models
    assert result["num_questions"] == 7
    assert result["num_correct"] == 5
    assert result["accuracy"] == pytest.approx(5 / 7)
    assert result["num_invalid"] == 1
    assert result["invalid_rate"] == pytest.approx(1 / 7)
    assert [r["correct"] for r in result["records"]] == [True, True, True, True, False, False, True]
    assert [r["predicted"] for r in result["records"]][3:6] == ["42", "13", None]
    assert result["output_tokens_per_s"] > 0 and result["latency_ms"]["p99"] >= result["latency_ms"]["median"]
    assert "Accuracy:" in capsys.readouterr().out

    body = request_for(server, "How many apples, q0?")
    assert body["temperature"] == 0.0 and body["max_tokens"] == 512 and body["stop"] == ["Question:"]
    if api == "completions":
        prompt = body["prompt"]
        assert prompt.startswith("Question: Train question 0?\nAnswer: It is 0.\n#### 0\n\n")
        assert prompt.count("Question:") == 6 and prompt.endswith("Question: How many apples, q0?\nAnswer:")
    else:
        turns = body["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * 5 + ["user"]
        assert turns[1]["content"] == "It is 0.\n#### 0" and turns[-1]["content"] == "Question: How many apples, q0?"


def test_gsm8k_selection_and_shots(gsm8k_data, tmp_path):
    items = gsm8k.load_items(str(gsm8k_data), num_questions=3, num_shots=2, api="completions", seed=None)
    assert [i.gold for i in items] == ["7", "1234", "2.5"]
    assert items[0].prompt.count("Question:") == 3
    sampled = gsm8k.load_items(str(gsm8k_data), num_questions=3, num_shots=0, api="completions", seed=1)
    again = gsm8k.load_items(str(gsm8k_data), num_questions=3, num_shots=0, api="completions", seed=1)
    assert [i.gold for i in sampled] == [i.gold for i in again]
    assert sampled[0].prompt.startswith("Question: ")  # no shots
    with pytest.raises(ValueError, match="fewer than 7 shots"):
        gsm8k.load_items(str(gsm8k_data), None, num_shots=7, api="completions", seed=None)
    with pytest.raises(ValueError, match="not found"):
        gsm8k.load_items(str(tmp_path / "missing.jsonl"), None, num_shots=0, api="completions", seed=None)


def test_select_is_deterministic_and_in_file_order():
    records = list(range(100))
    assert select(records, 5, None) == [0, 1, 2, 3, 4]
    sample = select(records, 10, seed=3)
    assert sample == select(records, 10, seed=3) == sorted(sample) and len(set(sample)) == 10
    assert sample != select(records, 10, seed=4)
    assert select(records, None, 3) == records and select(records, 500, None) == records
    with pytest.raises(ValueError):
        select(records, 0, None)


def test_gsm8k_request_errors_count_as_invalid(gsm8k_data, tmp_path):
    records = [json.loads(line) for line in gsm8k_data.read_text().splitlines()]
    records.append({"question": "FAIL q7?", "answer": "#### 1"})
    write_jsonl(gsm8k_data, records)
    out = tmp_path / "gsm8k.json"
    with FakeOpenAIServer(FakeServerOptions(responder=gsm8k_responder)) as server:
        rc = gsm8k.main(
            ["--base-url", server.url, "--data", str(gsm8k_data), "--output-json", str(out), "--disable-tqdm"]
        )
    result = json.loads(out.read_text())
    assert rc == 1
    assert result["num_errors"] == 1 and result["num_correct"] == 5 and result["num_invalid"] == 2
    assert "HTTP 500" in result["records"][-1]["error"]


def test_score_per_subject():
    items = [EvalItem("p", "A", "s1"), EvalItem("p", "B", "s1"), EvalItem("p", "C", "s2")]
    replies = [Completion(text="A"), Completion(text="zzz"), Completion(error="HTTP 500: boom")]
    records, summary = score(items, replies, lambda text: text if text in "ABCD" and text else None)
    assert [r["correct"] for r in records] == [True, False, False]
    assert summary["num_invalid"] == 2 and summary["num_errors"] == 1
    assert summary["per_subject"] == {
        "s1": {"num_questions": 2, "accuracy": 0.5},
        "s2": {"num_questions": 1, "accuracy": 0.0},
    }
    assert summary["subject_average_accuracy"] == pytest.approx(0.25)


# MMLU: subject -> [(question, answer index, scripted reply)]. Astronomy 2/3 right, zoology 1/2 right with one
# invalid reply, so the question-weighted accuracy (3/5) differs from the subject average (7/12).
MMLU_SCRIPT = {
    "astronomy": [
        ("Which planet is red?", 2, " C"),
        ("Which is a star?", 0, " B"),
        ("Largest moon?", 3, "(D)"),
    ],
    "zoology": [("Which is a mammal?", 1, " b\n\nThe following"), ("Which lays eggs?", 2, " unsure")],
}
MMLU_REPLIES = {q: reply for rows in MMLU_SCRIPT.values() for q, _, reply in rows}


def mmlu_responder(prompt: str) -> str:
    # The asked question is the first line of the last example (examples are separated by blank lines).
    return MMLU_REPLIES[prompt.split("\n\n")[-1].split("\n")[0]]


@pytest.fixture
def mmlu_dir(tmp_path):
    test, dev = [], []
    # Subjects out of order in the file: the tool sorts them itself.
    for subject, rows in reversed(MMLU_SCRIPT.items()):
        test += [{"subject": subject, "question": q, "choices": ["w", "x", "y", "z"], "answer": a} for q, a, _ in rows]
        dev += [
            {
                "subject": subject,
                "question": f"{subject} dev {i}",
                "choices": ["1", "2", "3", "4"],
                "answer": i % 4,
            }
            for i in range(5)
        ]
    write_jsonl(tmp_path / "test.jsonl", test)
    write_jsonl(tmp_path / "dev.jsonl", dev)
    return tmp_path


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_mmlu_end_to_end(mmlu_dir, tmp_path, api):
    out = tmp_path / "mmlu.json"
    with FakeOpenAIServer(FakeServerOptions(responder=mmlu_responder)) as server:
        argv = ["--base-url", server.url, "--data", str(mmlu_dir), "--api", api, "--disable-tqdm"]
        rc = mmlu.main([*argv, "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_questions"] == 5 and result["num_correct"] == 3 and result["num_invalid"] == 1
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["per_subject"]["astronomy"]["accuracy"] == pytest.approx(2 / 3)
    assert result["per_subject"]["zoology"]["accuracy"] == pytest.approx(1 / 2)
    assert result["subject_average_accuracy"] == pytest.approx(7 / 12)
    by_question = [r["gold"] for r in result["records"]]
    assert by_question == ["C", "A", "D", "B", "C"]  # subjects sorted, questions in file order within them

    body = request_for(server, "Which planet is red?")
    assert body["temperature"] == 0.0 and body["max_tokens"] == 16
    header = "The following are multiple choice questions (with answers) about astronomy.\n\n"
    if api == "completions":
        assert body["stop"] == ["\n\n"]
        assert body["prompt"].startswith(header + "astronomy dev 0\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: A\n\n")
        assert body["prompt"].count("\nAnswer:") == 6
        assert body["prompt"].endswith("\n\nWhich planet is red?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    else:
        assert "stop" not in body
        turns = body["messages"]
        assert len(turns) == 11 and turns[0]["content"].startswith(header) and turns[1]["content"] == "A"
        assert turns[-1]["content"] == "Which planet is red?\nA. w\nB. x\nC. y\nD. z\nAnswer:"


def test_mmlu_selection(mmlu_dir):
    items = mmlu.load_items(str(mmlu_dir / "test.jsonl"), 1, 2, num_shots=3, api="completions", seed=None)
    assert [(i.subject, i.gold) for i in items] == [("astronomy", "C"), ("astronomy", "A")]
    assert items[0].prompt.count("\nAnswer:") == 4
    with pytest.raises(ValueError, match="has 5 dev examples, need 6"):
        mmlu.load_items(str(mmlu_dir), None, None, num_shots=6, api="completions", seed=None)
    write_jsonl(mmlu_dir / "test.jsonl", [{"subject": "x", "question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(ValueError, match="4 choices"):
        mmlu.load_items(str(mmlu_dir), None, None, num_shots=0, api="completions", seed=None)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data sets not present")
def test_real_data_loads_and_scores_with_an_oracle(tmp_path):
    test_path = SHARED_DATA / "gsm8k" / "test.jsonl"
    everything = gsm8k.load_items(str(test_path), None, num_shots=5, api="completions", seed=None)
    assert len(everything) == 1319 and all(item.gold for item in everything)
    questions = [json.loads(line) for line in test_path.read_text().splitlines()[:10]]
    oracle = {q["question"].strip(): q["answer"] for q in questions}
    out = tmp_path / "gsm8k.json"
    with FakeOpenAIServer(
        FakeServerOptions(responder=lambda p: oracle[p.rsplit("Question: ", 1)[1].split("\nAnswer:")[0].strip()])
    ) as server:
        argv = ["--base-url", server.url, "--data", str(test_path), "--num-questions", "10", "--disable-tqdm"]
        assert gsm8k.main([*argv, "--output-json", str(out)]) == 0
    assert json.loads(out.read_text())["accuracy"] == 1.0

    mmlu_items = mmlu.load_items(str(SHARED_DATA / "mmlu"), None, None, num_shots=5, api="completions", seed=None)
    assert len(mmlu_items) == 14042 and len({i.subject for i in mmlu_items}) == 57
    assert {i.gold for i in mmlu_items} == set("ABCD")
