"""The official evaluation of the datasets whose domains are the groups (the built-in synthetic
one and the custom kind): accuracy overall, per domain and on the worst domain, and macro F1,
all by wilds' own metric code."""

from __future__ import annotations

from wilds.common.metrics.all_metrics import F1, Accuracy

from pipeline.data.scatter import install_scatter_fallback

install_scatter_fallback()  # wilds' group-wise eval imports torch_scatter


def domain_eval(dataset, grouper, y_pred, y_true, metadata, prediction_fn=None) -> tuple[dict, str]:
    """(results, results_str): acc_avg, acc_domain:<name>, count_domain:<name>, acc_worst_domain
    (over the domains present in these examples: wilds skips empty groups) and F1-macro_all."""
    accuracy = Accuracy(prediction_fn=prediction_fn)
    results, results_str = dataset.standard_group_eval(accuracy, grouper, y_pred, y_true, metadata)
    results["acc_worst_domain"] = results.pop(accuracy.worst_group_metric_field)
    f1 = F1(prediction_fn=prediction_fn, average="macro")
    results.update(f1.compute(y_pred, y_true))
    results_str += f"Macro F1: {results[f1.agg_metric_field]:.3f}\n"
    return results, results_str
