"""A transformers VLM checkpoint and an image-question file, as a data source of the harness.

    python -m zipvl_compile.eval --model llava-hf/llava-onevision-qwen2-7b-ov-hf \\
        --questions questions.jsonl --plot acc.png

The question file is JSON Lines, one question per line::

    {"image": "images/0001.png", "question": "How many red squares?", "answer": "3",
     "level": "hard"}

- ``image``: a path (relative to the file's folder) or a list of paths, in prompt order.
- ``question``: the text after the image(s); the checkpoint's chat template builds the prompt
  (``{"type": "image"}`` entries, then the question, then the generation prompt).  A line may
  instead give ``prompt``: the full prompt text with the processor's image token(s) in it, for
  checkpoints without a chat template.
- ``answer``: the expected answer, or a list of accepted answers.
- ``level`` (optional, default ``"all"``): results are reported per level, in the order levels
  first appear.

A generated answer is correct when, lower-cased, stripped of surrounding whitespace and
punctuation, its first line equals an accepted answer or starts with one followed by a
non-alphanumeric character ("3 squares" matches "3"; "30" does not).  Generation is greedy,
``max_new_tokens`` tokens at most, batched with left padding.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from .helpers import cache_kwarg

FIELDS = ("image", "question", "answer")


@dataclass(frozen=True)
class Question:
    """One line of a question file: ``images`` absolute paths, ``answers`` accepted answers."""

    images: tuple[Path, ...]
    question: str
    answers: tuple[str, ...]
    level: str = "all"
    prompt: str | None = None


def read_questions(path: str | Path) -> list[Question]:
    """Parse a question file (module docstring).  Raises ``ValueError`` naming the line and
    field of a malformed entry and ``FileNotFoundError`` for a missing image."""
    path = Path(path)
    out = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: not a JSON object")
        need = ("image", "answer") + (() if "prompt" in entry else ("question",))
        missing = [f for f in need if f not in entry]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} (each line needs "
                             f"{list(FIELDS)}; 'prompt' may replace 'question')")
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        answers = entry["answer"] if isinstance(entry["answer"], list) else [entry["answer"]]
        if not images or not all(isinstance(i, str) for i in images):
            raise ValueError(f"{where}: 'image' must be a path or a non-empty list of paths")
        if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
            raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of them")
        resolved = tuple((path.parent / i).resolve() for i in images)
        for img in resolved:
            if not img.is_file():
                raise FileNotFoundError(f"{where}: image {img} does not exist")
        out.append(Question(resolved, str(entry.get("question", "")),
                            tuple(str(a) for a in answers), str(entry.get("level", "all")),
                            entry.get("prompt")))
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def normalize(text: str) -> str:
    lines = text.strip().splitlines()
    return (lines[0] if lines else "").strip().strip(string.punctuation + " ").lower()


def matches(generated: str, answers) -> bool:
    """The rule of the module docstring."""
    got = normalize(generated)
    for answer in answers:
        want = normalize(answer)
        if got == want or (got.startswith(want) and want and not got[len(want)].isalnum()):
            return True
    return False


def load_checkpoint(name: str, *, device: str | None = None, dtype: str | None = None):
    """(model, processor) of a transformers image-text-to-text checkpoint (hub id or local
    folder), SDPA attention (the attention the zipvl backend rewrites), eval mode.  Defaults:
    CUDA and bf16 when available, else CPU and fp32."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. bfloat16, float32)")
    processor = AutoProcessor.from_pretrained(name)
    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return model, processor


class CheckpointQuestions:
    """A checkpoint answering a question file: the harness's data-source interface (see
    ``eval.ToyQuestions``).  Predictions are the generated answer texts."""

    def __init__(self, model, processor, questions: list[Question], *,
                 max_new_tokens: int = 16):
        self.model, self.processor, self.questions = model, processor, questions
        self.max_new_tokens = max_new_tokens
        self.levels = tuple(dict.fromkeys(q.level for q in questions))

    def count(self, level: str) -> int:
        return sum(q.level == level for q in self.questions)

    def batches(self, level: str, batch: int):
        chosen = [q for q in self.questions if q.level == level]
        for i in range(0, len(chosen), batch):
            yield chosen[i:i + batch]

    def prompt(self, q: Question) -> str:
        if q.prompt is not None:
            return q.prompt
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError("the checkpoint's processor has no chat template: give each line "
                             "of the question file a 'prompt' with the image token(s) in it")
        content = [{"type": "image"} for _ in q.images] + [{"type": "text", "text": q.question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True)

    def inputs(self, chunk: list[Question]) -> dict:
        """Processor outputs for a batch, on the model's device (floats in its dtype)."""
        from PIL import Image

        images = [[Image.open(p).convert("RGB") for p in q.images] for q in chunk]
        enc = self.processor(text=[self.prompt(q) for q in chunk], images=images,
                             padding=True, return_tensors="pt")
        dev, dtype = self.model.device, self.model.dtype
        return {k: v.to(dev, dtype) if v.is_floating_point() else v.to(dev)
                for k, v in enc.items()}

    @torch.no_grad()
    def answer(self, chunk: list[Question], cache) -> tuple[int, list[str]]:
        inputs = self.inputs(chunk)
        tok = self.processor.tokenizer
        out = self.model.generate(**inputs, **cache_kwarg(self.model, cache),
                                  do_sample=False,
                                  max_new_tokens=self.max_new_tokens,
                                  pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return sum(matches(t, q.answers) for t, q in zip(texts, chunk)), texts

    def describe(self) -> str:
        per = ", ".join(f"{lv} {self.count(lv)}" for lv in self.levels)
        return f"{len(self.questions)} questions ({per}); greedy, <= {self.max_new_tokens} tokens"
