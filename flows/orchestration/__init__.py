"""How flows run: in process or under Prefect (engine), what a flow run shows in the Prefect UI
(report), signals as clean stops (interrupts), self-healing jobs (healing), a work pool's worker
(worker) and its jobs seen from the submitting command (pool). Imports tracking, setup and
components."""
