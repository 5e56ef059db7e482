"""Pruning and fine-tuning: criteria, granularity, schedules, enforced masks, the fine-tuning loop,
the accuracy-targeted search, and export as a plain pruned state_dict (see docs/pruning.md)."""
from .criteria import METHODS, scores
from .finetune import TrainConfig, evaluate, finetune
from .granularity import Granularity, PruneError, parse_granularity
from .loop import SearchResult, Task, Trial, run_trial, search_sparsity
from .masks import MaskSet, export_state_dict, model_sparsity, prunable_layers, split_state_dict
from .pruner import PruneConfig, calibration_batches, compute_masks
from .report import describe_architecture
from .schedule import cubic_sparsity, pruning_plan

__all__ = ["METHODS", "scores", "TrainConfig", "evaluate", "finetune", "Granularity", "PruneError",
           "parse_granularity", "SearchResult", "Task", "Trial", "run_trial", "search_sparsity", "MaskSet",
           "export_state_dict", "model_sparsity", "prunable_layers", "split_state_dict", "PruneConfig",
           "calibration_batches", "compute_masks", "describe_architecture", "cubic_sparsity", "pruning_plan"]
