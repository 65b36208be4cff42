"""Evaluation: metrics of the fixed protocol, reference featurizer, NFE sweeps, plots and the HTML report."""

from components.evaluation.featurizer import (
    ClassifierConfig,
    MissingDependencyError,
    ReferenceClassifier,
    extract_features,
    inception_fid,
    load_classifier,
    predict_labels,
    save_classifier,
)
from components.evaluation.metrics import (
    DEFAULT_MMD_BANDWIDTHS,
    DEFAULT_N_DIRECTIONS,
    PROTOCOL_SEED,
    class_accuracy,
    disjoint_subsets,
    fixed_directions,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    knn_precision_recall,
    mmd_rbf,
    path_length_ratio,
    ratio_to_floor,
    sliced_wasserstein2,
    straightness,
)
from components.evaluation.plots import (
    image_grid,
    quality_table_rows,
    quality_vs_nfe,
    scatter_grid,
    trajectory_plot,
    write_quality_table,
    write_quality_tables_per_model,
)
from components.evaluation import protocol, uncertainty
from components.evaluation.report import MetricsSchemaError, validate_metrics_schema, write_html_report

__all__ = [
    "ClassifierConfig", "MissingDependencyError", "ReferenceClassifier", "extract_features", "inception_fid",
    "load_classifier", "predict_labels", "save_classifier",
    "DEFAULT_MMD_BANDWIDTHS", "DEFAULT_N_DIRECTIONS", "PROTOCOL_SEED", "class_accuracy", "disjoint_subsets",
    "fixed_directions", "frechet_distance", "frechet_distance_from_statistics", "gaussian_statistics",
    "knn_precision_recall", "mmd_rbf", "path_length_ratio", "ratio_to_floor",
    "sliced_wasserstein2", "straightness",
    "image_grid", "quality_table_rows", "quality_vs_nfe", "scatter_grid", "trajectory_plot",
    "write_quality_table", "write_quality_tables_per_model",
    "protocol", "uncertainty", "MetricsSchemaError", "validate_metrics_schema", "write_html_report",
]
