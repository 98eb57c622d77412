"""Runs and their state in MLflow: the store and what runs record (store), tag names (names), the one
writer into a run through outages (outbox), a training's lease, checkpoints and resume (lifecycle),
and registry promotion (promotion). Imports setup and components."""
