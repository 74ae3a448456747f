"""The run form's descriptions: the text the Kubeflow UI shows under each pipeline parameter, written once.

KFP copies each entry of a pipeline function's Google-style ``Args:`` section to
``root.inputDefinitions.parameters.<name>.description`` (``extract_component_interface`` in
kfp/dsl/component_factory.py, which parses ``inspect.getdoc(func)`` with docstring_parser). `run_form_doc` writes
that section from the tables below, in the order of the function's parameters, so a parameter both pipelines share
is described once; the types, defaults and allowed values are the constraint table of visionpipe/specs/params.py.
Torch- and kfp-free.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

SHARED: dict[str, str] = {
    "image_size": (
        "Side, 1..4096 pixels, to which every image is resized (image_size x image_size, bilinear)\n"
        "before it is stored; 0 = automatic: the native size when every image has the same one (MNIST\n"
        "folders), else the recipe's input side (preprocess.size, or with multi-view inference the larger\n"
        "side its tiles need); the data summary says which side was used and why."
    ),
    "recipe_overrides_json": (
        "JSON object overriding recipe fields, nested or with dotted keys, e.g.\n"
        '{"epochs": 3, "optimizer.lr": 0.01}; {} = the recipe as shipped.'
    ),
    "checkpoint_uri": (
        "s3://bucket/prefix (or an absolute folder every attempt sees) to which each epoch's\n"
        "training checkpoint is mirrored, so a retried training pod on an empty disk resumes; empty = the\n"
        "checkpoint stays in the pod only."
    ),
    "train_workers": (
        "Data-parallel training workers (torch.distributed), 1..64; 1 = one process in the step's pod.\n"
        "N > 1 on a cluster: the step creates a Kubeflow Trainer TrainJob of N nodes in the project image\n"
        "(ClusterTrainingRuntime visionpipe-torch-distributed, manifests/trainer) and waits for it; the\n"
        "dataset, checkpoints and model travel through S3 under checkpoint_uri (then required, s3://).\n"
        "Under kfp.local: N local torchrun workers. The outputs are the same as a one-process run's."
    ),
    "objective": (
        "Two-class threshold objective maximised on val_calib: mcc, f1, youden,\n"
        "recall_at_precision>=P or precision_at_recall>=R (P, R in [0, 1], e.g. recall_at_precision>=0.9).\n"
        "Ignored for multi-class tasks."
    ),
    "target_selective_accuracy": (
        "Multi-class tasks: the abstain threshold is the one with the largest coverage\n"
        "whose selective accuracy on val_calib is at least this value, in (0, 1]. Ignored for two-class tasks."
    ),
    "bootstrap": (
        "Number of bootstrap resamples (>= 1) for the 95% confidence interval of the objective at the\n"
        "chosen threshold."
    ),
    "calibration_method": (
        "Probability calibrator fitted on val_calib: auto (two classes: the simplest map within one\n"
        "paired SE of the lowest 10x5-fold cross-fitted NLL; more classes: the lowest 5-fold NLL),\n"
        "identity, temperature, platt, beta or isotonic; platt, beta and isotonic only for two-class tasks."
    ),
    "alpha": (
        "Miscoverage level in (0, 1) of the conformal prediction sets (they hold the true class with\n"
        "probability >= 1 - alpha) and the risk target of SCRC."
    ),
    "conformal_score": (
        "Conformal score of the prediction sets: lac, aps (randomized, Romano et al. 2020),\n"
        "aps-conservative (never empty, over-covers) or raps."
    ),
    "scrc_selection_rate": "Share of the images, in (0, 1], that SCRC selects (the rest abstain).",
    "scrc_delta": (
        "SCRC confidence level in (0, 1): with probability >= 1 - delta the risk on the selected\nimages is <= alpha."
    ),
    "active_policy": (
        "Decision policy the served bundle applies: threshold (the sweep's threshold) or scrc;\n"
        "the other one is kept as the fallback."
    ),
    "compiled_runtime": (
        "none = the bundle carries the torch model only; onnx = bundle_validation also exports it to ONNX\n"
        "(compiled/member-<i>.onnx, checksummed and signed) and refuses the bundle unless its decisions equal\n"
        "the torch model's on val_calib and val_test. Serve it with --runtime onnx (ONNX Runtime)."
    ),
    "model_name": (
        "Name of the bundle (and of its KServe InferenceService, `digits` by project convention);\n"
        "the bundle is published at <destination>/<model_name>/<version>/."
    ),
    "min_accuracy": "Quality gate: val_test accuracy must be >= this value (at most 1); negative = gate off.",
    "min_mcc": (
        "Quality gate for two-class tasks with positive_class set: val_test MCC must be >= this value,\n"
        "in [-1, 1]; below -1 = gate off."
    ),
    "max_ece": (
        "Quality gate: val_test expected calibration error (15 equal-width bins, calibrated\n"
        "probabilities) must be <= this value (at most 1); negative = gate off."
    ),
}

TRAINING: dict[str, str] = {
    "source": (
        "Where the labelled images come from: builtin://sklearn-digits (scikit-learn's 1,797 8x8 grey\n"
        "digits, no download), or an image folder laid out as <class>/<image> (.png, .jpg, .jpeg) under\n"
        "s3://bucket/prefix or a local path (a local path only where the step can read it, e.g. kfp.local).\n"
        "Class names are the folder names, sorted."
    ),
    "positive_class": (
        'For a two-class task, the class folder name that is "positive": the threshold sweep\n'
        "decides for it, the min_mcc gate and the MCC champion comparison apply, threshold_at_half is\n"
        "allowed. Must be one of the class names; empty = none (multi-class tasks)."
    ),
    "train_ratio": (
        "Share of the images in the train split (fits the model). Each ratio > 0; the four split\n"
        "ratios must sum to 1. Splits are stratified and identical images never straddle two splits."
    ),
    "val_select_ratio": "Share of the images in val_select (picks the best epoch). > 0; the four ratios sum to 1.",
    "val_calib_ratio": (
        "Share of the images in val_calib (fits the threshold, the calibrator and the conformal /\n"
        "SCRC parameters). > 0; the four ratios sum to 1."
    ),
    "val_test_ratio": (
        "Share of the images in val_test (reported on and gated on, never fitted on). > 0; the\nfour ratios sum to 1."
    ),
    "seed": (
        "Integer seed of the splits, of domain_pretrain, of the bootstrap and of the calibration folds (the\n"
        "training seed is the recipe's own `seed`)."
    ),
    "max_bad_fraction": (
        "Largest share of unreadable or non-image files in the source, in [0, 1); such files\n"
        "are left out and listed in the data summary, above this share the run fails."
    ),
    "recipe": (
        "Training recipe: a shipped name (digits-cnn, digits-cnn-mnist, digits-resnet18,\n"
        "roadwork-vit-dora, roadwork-dinov2-lora) or the path of a recipe YAML file inside the image."
    ),
    "domain_pretrain_enabled": (
        "true = first adapt the backbone with self-supervised domain_pretrain\n"
        "(ExPLoRA-style DINO on the train images, labels unused), then train from it; false = train directly."
    ),
    "pretrain_epochs": "Epochs of domain_pretrain (>= 1); used only when domain_pretrain_enabled is true.",
    "pretrain_max_steps": "Cap on domain_pretrain's optimizer steps (>= 0); 0 = no cap, the epochs decide.",
    "description": ('Free-text description in the model card; empty = "<model_name>: <K>-class image\nclassifier".'),
    "submitter": "Who submitted the run, recorded in the model card; empty = not recorded.",
    "parent_bundle": "URI of the bundle this one derives from, recorded in the provenance; empty = none.",
    "champion_uri": (
        "Bundle to compare with (a folder or s3://bucket/.../<name>/<version>): the run fails when\n"
        "the candidate's val_test MCC (two-class with positive_class) or accuracy is below the champion's\n"
        "minus champion_margin; empty = no champion check."
    ),
    "champion_margin": (
        "How much worse than the champion the candidate may be (>= 0, in units of the compared\n"
        "metric: MCC or accuracy)."
    ),
    "destination": (
        "Where the bundle is published, at <destination>/<model_name>/<version>/ (never\n"
        "overwritten). On a cluster it must be an s3://bucket/prefix URI (a pod's folders vanish with the\n"
        "pod); a local folder only with kfp.local (`visionpipe run` defaults it to ./bundles)."
    ),
    "threshold_at_half": (
        "true = publish a two-class bundle (positive_class set) whose calibrated probability is\n"
        "remapped so that the decision threshold sits at 0.5 (same decisions); false = publish as validated."
    ),
}

MONTHLY: dict[str, str] = {
    "data_prefix": (
        "Folder or s3://bucket/prefix holding the monthly data as <YYYY-MM>/<class>/<image> (.png,\n"
        ".jpg, .jpeg); on a cluster an s3:// prefix. Required."
    ),
    "champion_uri": (
        "The bundle in production (a folder or s3://bucket/.../<name>/<version>, a single model,\n"
        "not an ensemble): its backbone is the warm start, it is the parent in the provenance, and the\n"
        "challenger must not be worse than it by more than champion_margin on the new val_test. Required."
    ),
    "data_month": (
        "Month to train on, as YYYY-MM (e.g. 2026-10). Empty = the month before the run's scheduled\n"
        "time (a recurring run on 2026-11-01 trains on 2026-10), else before its creation time (one-off\n"
        "runs), in UTC; fetch_month reports the month and how it was chosen."
    ),
    "hard_examples_prefix": (
        "Where serving logs hard examples (VISIONPIPE_HARD_EXAMPLES); the labelled ones of\n"
        "the month, <hard_examples_prefix>/<YYYY-MM>/labelled/<class>/<image>, are added to the data;\n"
        "empty = none."
    ),
    "positive_class": (
        'For a two-class task, the class folder name that is "positive": the threshold sweep\n'
        "decides for it, the min_mcc gate and the MCC champion comparison apply. Must be one of the class\n"
        "names; empty = none (multi-class tasks)."
    ),
    "seed": (
        "Integer seed of the splits (0.7 / 0.1 / 0.1 / 0.1, stratified), of the bootstrap and of the\n"
        "calibration folds (the training seed is the recipe's own `seed`)."
    ),
    "recipe": (
        "Training recipe: a shipped name (digits-cnn, digits-cnn-mnist, digits-resnet18,\n"
        "roadwork-vit-dora, roadwork-dinov2-lora) or the path of a recipe YAML file inside the image; its\n"
        "architecture must match the champion's backbone (the warm start)."
    ),
    "submitter": "Who submitted the run, recorded in the model card.",
    "champion_margin": (
        "How much worse than the champion the challenger may be on the new val_test (>= 0, in\n"
        "units of the compared metric: MCC for two-class tasks with positive_class, else accuracy)."
    ),
    "destination": (
        "Where the bundle is published, at <destination>/<model_name>/<version>/ (never\n"
        "overwritten). On a cluster it must be an s3://bucket/prefix URI (a pod's folders vanish with the\n"
        "pod, and KServe reads the bundle from there); a local folder only with kfp.local."
    ),
    "start_canary_enabled": (
        "true = after export, patch InferenceService isvc_name in namespace so that\n"
        "canary_percent% of the traffic goes to the new bundle (needs manifests/pipeline-rbac); false = only\n"
        "publish."
    ),
    "isvc_name": (
        "Name of the KServe InferenceService to canary (the project's is `digits`); used only when\n"
        "start_canary_enabled is true."
    ),
    "namespace": "Kubernetes namespace of that InferenceService (the Kubeflow profile namespace).",
    "canary_percent": (
        "Share of the traffic, in percent (1..99), sent to the new bundle when the canary\nstarts "
        "(`visionpipe canary promote` then gives it all)."
    ),
}

PIPELINES: Mapping[str, Mapping[str, str]] = {"training": TRAINING, "monthly-retrain": MONTHLY}


def description(pipeline: str, name: str) -> str:
    """The UI description of `name` in `pipeline` ("training" or "monthly-retrain")."""
    own = PIPELINES[pipeline]
    if name in own:
        return own[name]
    if name in SHARED:
        return SHARED[name]
    raise KeyError(f"{pipeline} has no description for parameter {name!r}; add it to visionpipe/kfp/run_form.py")


def run_form_doc(pipeline: str) -> Callable[[F], F]:
    """Decorator (under ``@dsl.pipeline``): append the ``Args:`` section of every parameter of the function."""

    def decorate(func: F) -> F:
        lines = [inspect.cleandoc(func.__doc__ or ""), "", "Args:"]
        for name in inspect.signature(func).parameters:
            first, *rest = description(pipeline, name).split("\n")
            lines.append(f"    {name}: {first}")
            lines += [f"        {line}" for line in rest]
        func.__doc__ = "\n".join(lines) + "\n"
        return func

    return decorate
