"""A small image-question model in the LLaVA shape, trained in this repository on a synthetic
visual question-answering task whose answers depend on a few patches among many (issue 5).

- ``task``: the task generator (images of patches, questions, answers, difficulty levels).
- ``model``: patch encoder + projector + a ``transformers`` Llama decoder.
- ``train``: the training script (``python -m zipvl_compile.toyvlm.train``).
"""
