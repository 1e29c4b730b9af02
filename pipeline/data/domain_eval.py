"""What the datasets whose groups are their domains share (the built-in synthetic one and the
custom kind): the ID / OOD domain lists and the official evaluation (accuracy overall, per
domain and on the worst domain, and macro F1, all by wilds' own metric code)."""

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


class DomainDataset:
    """Mixin for a `WILDSDataset` with `attributes["id_domains" / "ood_domains"]` and a
    `_eval_grouper` over its domain field; put it before `WILDSDataset` in the bases."""

    attributes: dict

    @property
    def id_domains(self) -> tuple[str, ...]:
        return tuple(self.attributes["id_domains"])

    @property
    def ood_domains(self) -> tuple[str, ...]:
        return tuple(self.attributes["ood_domains"])

    def eval(self, y_pred, y_true, metadata, prediction_fn=None):
        """Accuracy (overall and per domain, with the worst domain) and macro F1, by wilds' metrics.

        Args:
            - y_pred (Tensor): predicted labels, or model outputs turned into labels by prediction_fn
            - y_true (LongTensor): true labels
            - metadata (Tensor): metadata rows of the same examples
            - prediction_fn (function): turns y_pred into predicted labels
        Output:
            - results (dict): acc_avg, F1-macro_all, acc_worst_domain, acc_domain:<name>, count_domain:<name>
            - results_str (str): a summary
        """
        return domain_eval(self, self._eval_grouper, y_pred, y_true, metadata, prediction_fn)
