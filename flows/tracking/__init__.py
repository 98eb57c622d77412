"""Runs and their state in MLflow: the store and what runs record (store), tag names (names), the one
writer into a run through outages (outbox), checkpoints in a run folder and in the artifact store
(checkpoints), a training's lease and resume (lifecycle), and registry promotion (promotion).
Imports setup and components."""
