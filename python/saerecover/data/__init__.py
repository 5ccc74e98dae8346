"""Data: loaders of what the tasks are made of (labelled text classes, multiple-choice
questions and corpora, refusal requests) from local files, the Hugging Face hub, or the toy
world's synthetic corpus. No model and no torch."""
