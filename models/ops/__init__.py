"""Custom operators, chiefly multi-scale deformable attention (`openset::ms_deform_attn`) with its
reference, CPU, GPU and ONNX forms.

- `ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`:
  the operator (dispatches by device: C++ on CPU, Triton on CUDA, reference elsewhere).
- `ms_deform_attn_reference`: the grid_sample oracle, callable directly.
- `MSDeformAttn`: the module with the official parameters and forward call.
- `export_onnx(..., msda_form="trt_plugin" | "grid_sample")`: the two ONNX forms;
  `models.ops.ort_plugin.ort_session` runs either with ONNX Runtime.
- `python -m models.ops.check PATH...`: every available kernel against golden cases.
"""

from models.ops.cpu_kernel import cpu_kernel_available, ms_deform_attn_cpu
from models.ops.functional import ms_deform_attn
from models.ops.module import MSDeformAttn
from models.ops.onnx_export import GRID_SAMPLE, TRT_PLUGIN, export_onnx
from models.ops.reference import ms_deform_attn_reference
from models.ops.triton_op import ms_deform_attn_triton, triton_available

__all__ = [
    "GRID_SAMPLE",
    "TRT_PLUGIN",
    "MSDeformAttn",
    "cpu_kernel_available",
    "export_onnx",
    "ms_deform_attn",
    "ms_deform_attn_cpu",
    "ms_deform_attn_reference",
    "ms_deform_attn_triton",
    "triton_available",
]
