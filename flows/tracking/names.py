"""The name of every MLflow tag and param cnnflow writes or reads, in one place, so a reader of one
side of a channel (the trainer and the search's judge, a run and `cnnflow runs`, a run and the next
one of a retraining sequence) finds the other. A family of names (one per role, per stage, per
lease generation) is a function of what varies. The run's settings go in as params under their own
dotted keys (`train.epochs`); those are the settings' names, not listed here."""

# ---------------------------------------------------------------- what a training run is
EXPERIMENT = "cnnflow.experiment"  # the recipe (conf/experiment/) it was composed from
SEED = "seed"
CONFIG_HASH = "config_hash"  # what a resume matches: the settings that decide what is trained
CODE_VERSION = "code_version"
HOST = "host"
OUTPUT_DIR = "output_dir"  # its folder on the machine that started it
ENV = "env."  # + a runtime fact: env.tensorflow, env.cpu_flags, ... (flows/setup/runtime.py, fingerprint)
PREFECT_FLOW_RUN = "prefect.flow_run_id"  # the Prefect flow run that trains it, when there is one
CLOSED = "cnnflow.closed"  # why a run found abandoned was closed, and when
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: a search's trials are children of its run


def split_partition(role: str) -> str:
    """The split string a role (train, valid, test) was taken from."""
    return f"split.{role}"


def split_size(role: str) -> str:
    return f"split.{role}_size"


def data_fingerprint(role: str) -> str:
    """The content fingerprint of what the role held (components/data/fingerprint.py)."""
    return f"data.{role}_fingerprint"


def cache_of(role: str) -> str:
    """Where a role's decoded images were kept: memory, disk or none (components/data/caching.py)."""
    return f"cache.{role}"


# ---------------------------------------------------------------- how it ran
DEVICES, PRECISION, REPLICAS = "devices", "precision", "replicas"
PRECISION_WHY, PRECISION_BASIS = "precision.why", "precision.basis"  # params: what auto measured (flows/setup/precision.py)

# ---------------------------------------------------------------- what it made
MODEL_URI = "model_uri"  # the Keras model of the newest stage
SERVING_URI = "serving_uri"  # the pyfunc that takes image files (components/serving.py)
KERAS_MODEL_URI = "keras_model_uri"  # on a registered version: the Keras model behind its serving pyfunc
REGISTRY_OUTCOME = "registry.outcome"
REGISTRY_PREVIOUS_CHAMPION = "registry.previous_champion"


def registered_metric(metric: str) -> str:
    """On a registered version: the metric it was compared by when it was registered."""
    return f"metric.{metric}"


# ---------------------------------------------------------------- stages, restarts, leases
STAGES, EPOCHS_TOTAL = "stages", "epochs_total"
RESTART_EPOCHS, RESTARTS = "restart_epochs", "restarts"
LEASE = "lease."  # + a generation: the param naming who holds the run's lease (flows/tracking/lifecycle.py)
LEASE_RELEASED = "lease.released"
LEASE_HEARTBEAT_BEFORE_0_2 = "lease.heartbeat"  # one tag "generation time", as cnnflow before 0.2 wrote it
LOCK = "cnnflow.lock"  # on the store-wide lock's bookkeeping runs: what they lock


def stage_epochs(stage: int) -> str:
    return f"stage.{stage}.epochs"


def stage_overrides(stage: int) -> str:
    return f"stage.{stage}.overrides"


def lease_holder(generation: int) -> str:
    return f"{LEASE}{generation}"


def lease_heartbeat(generation: int) -> str:
    return f"lease.heartbeat.{generation}"


# ---------------------------------------------------------------- evaluations
EVALUATION_OF = "evaluation_of"  # the training run an evaluation run evaluated
EVALUATED_SPLIT = "split"
EVALUATED_FINGERPRINT = "data.eval_fingerprint"

# ---------------------------------------------------------------- sweeps and retraining sequences
SWEEP, SWEEP_JOB = "sweep", "sweep_job"
RETRAIN_SCHEDULE = "retrain_schedule"
RETRAIN_SUBSET_SIZE = "retrain_subset_size"
RETRAIN_SEQUENCE = "retrain_sequence"
RETRAIN_PREVIOUS_CHAMPION = "retrain_previous_champion"
RETRAIN_WARM_START = "retrain_warm_start"
RETRAIN_PREVIOUS_RUN = "retrain_previous_run"
RETRAIN_ADDED = "retrain_added"
RETRAIN_CONTAINS_PREVIOUS = "retrain_contains_previous"

# ---------------------------------------------------------------- searches
SEARCH, SEARCH_TRIAL = "search", "search_trial"  # on a trial's run: its study and number
SEARCH_STUDY = "search.study"  # on the search's own run
SEARCH_BUDGET_TRIALS, SEARCH_BUDGET_EPOCHS = "search.budget.trials", "search.budget.epochs"
SEARCH_BEST_TRIAL, SEARCH_BEST_RUN, SEARCH_BEST_PARAMS = "search.best_trial", "search.best_run", "search.best_params"
# a search trial's channel (flows/search/pruning.py): the trainer reports each epoch, the judge answers
REPORT_TAG, VERDICT_TAG, STATE_TAG = "search.report", "search.verdict", "search.state"

