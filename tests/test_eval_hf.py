"""The harness's checkpoint path: a transformers checkpoint folder and an image-question file."""
import json

import pytest
import torch

from zipvl_compile import eval as harness
from zipvl_compile import eval_hf, tiny_models

PROBES = ["--recent-probes", "4", "--random-probes", "4", "--keep-recent", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    tiny_models.llava_checkpoint(root / "ckpt")
    (root / "img").mkdir()
    lines = []
    for i in range(5):
        Image.new("RGB", (40 + 8 * i, 40), (40 * i, 200, 10)).save(root / "img" / f"{i}.png")
        lines.append({"image": f"img/{i}.png", "question": f"what is {i}?" + " ?" * i,
                      "answer": [str(i), f"n{i}"], "level": "easy" if i < 3 else "hard"})
    (root / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return root


def test_answer_matching_rule():
    assert eval_hf.matches(" 3 squares.\nmore", ["3"])
    assert eval_hf.matches("Red!", ["red"]) and eval_hf.matches("x", ["y", "X"])
    assert not eval_hf.matches("30", ["3"]) and not eval_hf.matches("", ["3"])


def test_question_file_errors_name_the_line_and_field(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"image": "a.png", "question": "q", "answer": "1"}\n{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: missing field\(s\) \['answer', 'question'"):
        eval_hf.read_questions(bad)
    bad.write_text('{"image": "nope.png", "question": "q", "answer": "1"}\n')
    with pytest.raises(FileNotFoundError, match="nope.png"):
        eval_hf.read_questions(bad)
    bad.write_text('[1]\n')
    with pytest.raises(ValueError, match="q.jsonl:1: not a JSON object"):
        eval_hf.read_questions(bad)
    bad.write_text('{"image": "a.png", "prompt": "<image> q", "answer": []}\n')
    with pytest.raises(ValueError, match="'answer' must be"):
        eval_hf.read_questions(bad)


@torch.no_grad()
def test_harness_evaluates_a_checkpoint_on_a_question_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    results = harness.main(["--model", str(checkpoint / "ckpt"), "--questions",
                            str(checkpoint / "q.jsonl"), "--taus", "0.975", "--caches", "4/2",
                            "--batch", "2", "--max-new-tokens", "3", "--group-size", "8",
                            "--residual-length", "2", "--no-inductor", "--no-progress",
                            "--json", str(out), *PROBES])
    names = list(dict.fromkeys(r.setting for r in results))
    assert names[0] == "dense" and names[1] == "zipvl tau=0.975"
    assert names[2].startswith("fixed ratio") and names[3] == "zipvl tau=0.975 + cache 4/2"
    assert [r.level for r in results[:2]] == ["easy", "hard"]
    assert [r.n for r in results[:2]] == [3, 2]

    # the dense row is exactly what generate() answers on the same prompts
    model, processor = eval_hf.load_checkpoint(str(checkpoint / "ckpt"))
    data = eval_hf.CheckpointQuestions(model, processor,
                                       eval_hf.read_questions(checkpoint / "q.jsonl"),
                                       max_new_tokens=3)
    inputs = data.inputs(data.questions)
    assert (inputs["input_ids"][:, 0] == processor.tokenizer.pad_token_id).any()  # left padding
    ids = model.generate(**inputs, do_sample=False, max_new_tokens=3,
                         pad_token_id=processor.tokenizer.pad_token_id)
    texts = processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:],
                                             skip_special_tokens=True)
    dense = results[0].predicted + results[1].predicted
    assert dense == texts
    assert results[0].correct == sum(eval_hf.matches(t, q.answers)
                                     for t, q in zip(texts[:3], data.questions[:3]))
    for r in results:
        assert len(r.predicted) == r.n and all(isinstance(t, str) for t in r.predicted)
        if r.setting != "dense":  # 2 decoder layers, each with a prefill kept ratio
            assert len(r.kept) == 2 and all(0 < k <= 1 for k in r.kept)
    cached = [r for r in results if r.setting.endswith("4/2")]
    assert all(0 < r.kv_fraction < 1 for r in cached)
    printed = capsys.readouterr().out
    assert "5 questions (easy 3, hard 2)" in printed and json.loads(out.read_text())


def test_model_and_questions_go_together():
    with pytest.raises(SystemExit):
        harness.main(["--model", "x"])
