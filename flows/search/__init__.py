"""`cnnflow search`: an Optuna study over a recipe's settings; each trial is one training run.

    cnnflow search experiment=fashion_mnist_fast data.source=idx data.path=DIR search.epochs=45 \\
        'model.width=int(interval(16,64))' 'optimizer.learning_rate=tag(log,interval(1e-3,2e-2))' \\
        'data.batch_size=choice(64,128,256)'

The space is written in Hydra's sweep grammar, as Hydra's Optuna sweeper reads it (or in a file of
conf/search/); every other override is fixed. The study lives in an Optuna storage (SQL beside a
SQLite MLflow store), so the same command again continues it: trials still training are taken up
where they are and no trial is counted twice. A trial is a training run tagged search=<study> and
search_trial=<n>, a child of the search's MLflow run; it never evaluates the test split
(train.test=false). When the budget is spent, the best trial alone is evaluated on test.

Pruning goes through the MLflow store alone, so a trial may train on any worker of a pool: at each
epoch end the trainer writes the epoch's metrics to its run's tag `search.report` and waits, briefly,
for the tag `search.verdict`, which this command's judge thread writes after asking the study's
pruner. A trainer that hears no verdict trains on; a judge that comes back judges what is reported.

The package reads top-down, each module importing only those above it: `space` (the plan: the
space, budget and storage, checked), `study` (the Optuna study and its trials), `pruning` (the
channel through MLflow tags: the judge and the trainer's callback), `report` (the best trial on
test, the table and the figures), `flow` (the search flow, here or on a pool).
"""
