"""A study's life: set it up (`setup`), run it (`session`, with its `worker` loop and a `pool`
of worker processes), recover from dead workers (`recovery`), and sum it up (`summary`)."""
