"""An ensemble's members: the predictions their trial runs logged, or their models run again on their splits."""

from __future__ import annotations

import numpy as np

from emnist_exp import data, serving
from emnist_exp.tracking import models, results

BATCH = 1024  # images per class_scores call: memory stays flat whatever the split's size


def member_predictions(run, reinfer: bool) -> dict[str, np.ndarray]:
    """Logged predictions, or (missing, or `reinfer`) the member's logged model run on its own splits."""
    cached = None if reinfer else results.load_predictions(run.info.run_id)
    if cached is not None:
        return cached
    p = run.data.params
    splits = data.load_splits(p["dataset"], val_fraction=float(p.get("val_fraction", 0.1)),
                              max_examples=int(p.get("max_examples", 0)), data_dir=p.get("data_dir", ""))
    model = serving.load_model(models.model_uri(run.info.run_id))
    out = {"classes": np.array(model.classes), "val_probs": split_scores(model, splits.val),
           "val_labels": splits.val_labels}
    if splits.test is not None:
        out["test_probs"] = split_scores(model, splits.test)
        out["test_labels"] = splits.test_labels
    return out


def split_scores(model: serving.ProjectModel, split) -> np.ndarray:
    """Class scores for an unbatched split, in order, as float16 like the logged predictions."""
    batches = [model.class_scores(images) for images, _ in split.batch(BATCH).as_numpy_iterator()]
    scores = np.concatenate(batches) if batches else np.zeros((0, len(model.classes)))
    return scores.astype(np.float16)
