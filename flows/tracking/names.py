"""The names cnnflow gives MLflow tags: one home, so a reader of one side of a channel (the trainer
and the search's judge, a run and `cnnflow runs`) finds the other."""

# a search trial's channel (flows/search/pruning.py): the trainer reports each epoch, the judge answers
REPORT_TAG, VERDICT_TAG, STATE_TAG = "search.report", "search.verdict", "search.state"
