"""`cnnflow`'s arguments: the commands, their options and their help (settings are Hydra's, named
by KEY=VALUE overrides; the command line only passes them on)."""

from __future__ import annotations

import argparse

from cnnflow.flows.setup.config import GROUPS, choices

USAGE_EXAMPLES = """examples:
  cnnflow train                                    offline quickstart on bundled digits (~1 min)
  cnnflow train experiment=mnist                   the chapter's MNIST CNN (TFDS downloads 11 MB)
  cnnflow train experiment=fashion_mnist data.source=idx data.path=DIR   from local IDX files
  cnnflow train experiment=mnist train.epochs=2 data.batch_size=128 seed=7
  cnnflow train --multirun experiment=quickstart seed=1,2,3
"""


def _groups_text() -> str:
    lines = ["config groups (choose with GROUP=CHOICE, e.g. data=fashion_mnist):"]
    lines += [f"  {group:<11} {', '.join(choices(group))}" for group in GROUPS]
    lines.append("any setting can be overridden with KEY=VALUE (e.g. train.epochs=2); +KEY=VALUE adds one")
    return "\n".join(lines)


def components_text() -> str:
    from cnnflow.flows.setup import runtime

    runtime.import_tensorflow_quietly()  # the registry imports the components, and they TensorFlow
    from cnnflow.components import registry

    lines = ["registered components (the `name:` a config selects):"]
    lines += [f"  {kind:<12} {', '.join(registry.names(kind))}" for kind in registry.KINDS]
    return "\n".join(lines)


class _HelpWithComponents(argparse.Action):
    """`cnnflow train --help` lists the registered components too (needs the TF import, so only here)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print("\n" + components_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnflow",
        description="Train, track and evaluate CNN image classifiers: Prefect flows, Hydra settings, MLflow runs.",
        epilog=_groups_text() + "\n\n" + USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(commands)
    _add_search(commands)
    _add_stages(commands)
    _add_orchestration(commands)
    _add_store_commands(commands)
    return parser


def _add_train(commands) -> None:
    """`train`: one training, a sweep (-m) or jobs on a pool."""
    train = commands.add_parser(
        "train", add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a model as an experiment plus overrides say; one Prefect flow run and one MLflow run",
        description="Run the train flow: load data -> choose precision -> split -> build model -> train -> evaluate "
                    "-> plot.",
        epilog=_groups_text() + "\n\n" + USAGE_EXAMPLES,
    )
    train.add_argument("-h", "--help", action=_HelpWithComponents, help="show this help and the registered components")
    train.add_argument("-m", "--multirun", action="store_true",
                       help="sweep: a,b,c values expand to one run per combination")
    train.add_argument("--pool", help="run each job on a Prefect work pool's workers (cnnflow deploy --pool NAME first)")
    train.add_argument("--no-wait", action="store_true", help="with --pool: return once the jobs are submitted")
    train.add_argument("--cfg", choices=("job", "all"),
                       help="print the composed, checked settings and stop, as Hydra's --cfg does (cnnflow has no "
                            "Hydra runtime section: all prints the same as job)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="experiment=NAME picks the recipe (default quickstart); others override settings")


def _add_search(commands) -> None:
    """`search`: a pruned hyperparameter search."""
    search = commands.add_parser(
        "search", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="pruned hyperparameter search (Optuna): trials until the budget is spent, the best one on test",
        description="Search a recipe's settings: overrides in Hydra's sweep grammar are the space, the others are "
                    "fixed; search.* (or search=NAME, a file of conf/search/) set the budget, sampler and pruner. "
                    "The same command again continues the study.",
        epilog="examples:\n  cnnflow search experiment=fashion_mnist_fast data.source=idx data.path=DIR search.epochs=45 \\\n"
               "      'model.width=int(interval(16,64))' 'optimizer.learning_rate=tag(log,interval(1e-3,2e-2))' \\\n"
               "      'data.batch_size=choice(64,128,256)'\n"
               "  cnnflow search experiment=fashion_mnist_fast search=fashion_mnist_fast data.source=idx data.path=DIR\n"
               "search settings (search.KEY=VALUE): trials, epochs, metric, direction, sampler (tpe, random), "
               "startup_trials,\n  pruner (hyperband, successive_halving, median, none), seed, name, storage, parallel, plots")
    search.add_argument("--pool", help="train each trial on a Prefect work pool's workers (cnnflow deploy --pool NAME first)")
    search.add_argument("--cfg", choices=("job", "all"), help="print the fixed settings, the search's own and its "
                                                              "space, checked, and stop")
    search.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _add_stages(commands) -> None:
    """`continue`, `evaluate` and `predict`: what comes after a training."""
    cont = commands.add_parser(
        "continue", help="train a run for more epochs, in the same MLflow run (epochs, history, optimizer state go on)",
        description="Continue a training from its last checkpoint: `cnnflow continue RUN_ID --epochs 10 "
                    "optimizer.learning_rate=1e-4`. Settings that define the model and data cannot change.")
    cont.add_argument("run_id", help="the MLflow run id (cnnflow prints it; also in the MLflow UI)")
    cont.add_argument("--epochs", type=_positive, default=10, help="how many more epochs (default 10)")
    cont.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optimizer.learning_rate=1e-4")
    evaluate = commands.add_parser(
        "evaluate", help="evaluate a logged or registered model on a split; logs an MLflow run",
        description="MODEL is a training run id, runs:/RUN_ID/model, models:/NAME@ALIAS or models:/NAME/VERSION.")
    evaluate.add_argument("model")
    evaluate.add_argument("split", nargs="?", default="test",
                          help="train, valid or test of the run's own split (default test), or a split "
                               "string of the data such as 'test[:500]'")
    predict = commands.add_parser(
        "predict", help="predict labels of image files or folders with a logged or registered model",
        description="Prints file, label and probability per image, preprocessed as the model's training "
                    "run did. MODEL as for evaluate.")
    predict.add_argument("model")
    predict.add_argument("paths", nargs="+", help="image files and/or folders of images")
    predict.add_argument("--csv", help="also write the table to this CSV file")
    predict.add_argument("--figure", help="also draw the images with their predictions to this PNG file")


def _add_orchestration(commands) -> None:
    """`serve` and `deploy`: every flow as a Prefect deployment."""
    serve = commands.add_parser(
        "serve", help="serve every flow as a Prefect deployment (needs a Prefect server)",
        description="Registers train, continue, evaluate, predict, retrain and search as deployments (train/EXPERIMENT, "
                    "retrain/EXPERIMENT, search/EXPERIMENT, continue/any-run, evaluate/any-model, predict/any-model) and runs them "
                    "when the Prefect UI, API or the retrain schedule asks. "
                    "KEY=VALUE settings set the defaults of train/retrain, e.g. experiment=celeba "
                    "data.path=/data/celeba 'retrain.cron=0 3 * * 0'.")
    serve.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    deploy = commands.add_parser(
        "deploy", help="register every flow as a deployment on a Prefect work pool, for workers on any machine",
        description="Registers train, continue, evaluate, predict, retrain and search as deployments '<flow>/POOL' on the "
                    "work pool POOL (of the type cnnflow, created if there is none) and returns. Any machine with "
                    "cnnflow installed runs them: prefect worker start --pool POOL. KEY=VALUE settings are the "
                    "defaults of train/retrain runs; runs report to this command's MLflow store.")
    deploy.add_argument("--pool", required=True, help="the Prefect work pool")
    deploy.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def _add_store_commands(commands) -> None:
    """`runs`, `data`, `cache` and `components`: what the store and this machine hold."""
    runs = commands.add_parser("runs", help="compare recent runs of an experiment in a table")
    runs.add_argument("experiment", nargs="?", default=None, help="the MLflow experiment (default: all)")
    runs.add_argument("--limit", type=_positive, default=20, help="how many of the newest runs (default 20)")
    data = commands.add_parser("data", help="compare what two runs trained on: cnnflow data diff RUN_A RUN_B",
                               description="Per split role, how many examples RUN_B added, removed or changed against "
                                           "RUN_A (compared by their bytes), and whether the test split is the same.")
    data.add_argument("action", choices=("diff",))
    data.add_argument("runs", nargs=2, metavar="RUN", help="run ids, or unique prefixes as cnnflow runs prints them")
    cache = commands.add_parser(
        "cache", help="list, verify, prune or clear the data caches and checkpoint copies cnnflow keeps",
        description="The disk cnnflow keeps outside the MLflow store: data caches (data.cache=disk) and the "
                    "checkpoint copies of finished runs, which prune and clear remove (least recently used first; "
                    "never what a running training reads, nor an unfinished run's checkpoints), and run folders "
                    "under outputs/, which list shows.")
    cache.add_argument("action", choices=("list", "verify", "prune", "clear"))
    cache.add_argument("--dir", default=None, help="the data cache folder (default: data.cache_dir's, "
                                                   "~/.cache/cnnflow/tf.data)")
    cache.add_argument("--outputs", default="outputs", help="the run folders' root (default: outputs)")
    cache.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                       help="prune: caches last used more than DAYS ago")
    cache.add_argument("--max-size", default=None, metavar="SIZE", help="prune: then the least recently used until "
                                                                       "the rest fit in SIZE (500M, 20G)")
    components = commands.add_parser("components", help="list the registered components of each kind")
    components.add_argument("kind", nargs="?", help="only this kind")


def _positive(text: str) -> int:
    """A whole number of at least 1, or argparse's one-line refusal naming the value."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return number
