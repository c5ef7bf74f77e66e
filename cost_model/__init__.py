"""The cost model: bytes and FLOPs per op from recorded shapes (ops), what the GPU can do
(device: calibrated or datasheet profiles), and roofline times of a chain now and fused
(roofline). `fusion-advisor calibrate` (calibrate) measures a profile on the GPU at hand."""
from fusion_advisor.cost_model.device import DeviceProfile, datasheet_profiles, load_profile, match_target
from fusion_advisor.cost_model.ops import OpCost, TensorSpec, op_cost, unknown_reason
from fusion_advisor.cost_model.roofline import (achieved_bandwidth, cluster_estimate, is_memory_bound,
                                                kernel_time_us)

__all__ = ["DeviceProfile", "datasheet_profiles", "load_profile", "match_target", "OpCost", "TensorSpec",
           "op_cost", "unknown_reason", "achieved_bandwidth", "cluster_estimate", "is_memory_bound",
           "kernel_time_us"]
