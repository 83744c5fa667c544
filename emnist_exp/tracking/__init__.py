"""Everything that talks to MLflow, one noun per room.

- tags: the tags that find the project's runs, and quoting for search filters;
- store: the local SQLite store, prepared and repaired under a lock;
- experiments: a study's experiment, the one the user chose, and its address in the UI;
- launcher: `mlflow run`'s own run, kept, handed over or set back after the CLI exits;
- runs: the study run, one nested run per trial, per-epoch metrics;
- endings: how a run ends, a lost store's sentence, the runs a lost worker or store left RUNNING;
- checkpoints: a trial's training state as an artifact of its run, while the trial is unfinished;
- datasets: the splits as MLflow dataset inputs;
- results: what a finished trial or study leaves in its run (metrics, predictions, plots);
- models: LoggedModels of trials and ensembles, the exported graph, the registry;
- queries: reading the store back (latest study, finished trials, a study's runs);
- views: the curated runs table (a saved view of the UI) that the printed address opens.

Callers import the room they need: `from emnist_exp.tracking import runs`.
"""
