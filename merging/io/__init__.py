"""Reading and writing checkpoints, the Hugging Face Hub, where sources and outputs may be, the disk cache."""
