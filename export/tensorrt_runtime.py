"""A TensorRT engine as a `GraphRunner` (`export.runtime`): numpy in, numpy out, CUDA in between.

Needs TensorRT and a CUDA build of torch (used for device buffers and the stream); both imports are
guarded so the module imports anywhere. The optimisation profile of each call is the first one
whose (min, max) shapes hold every input (`pick_profile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

Bounds = dict[str, tuple[Sequence[int], Sequence[int]]]


def pick_profile(shapes: dict[str, tuple[int, ...]], profiles: list[Bounds]) -> int:
    """Index of the first profile whose (min, max) bounds hold every input shape."""
    for index, bounds in enumerate(profiles):
        if all(
            len(shape) == len(bounds[name][0])
            and all(lo <= s <= hi for s, lo, hi in zip(shape, bounds[name][0], bounds[name][1], strict=True))
            for name, shape in shapes.items()
            if name in bounds
        ):
            return index
    raise ValueError(
        f"input shapes {shapes} fall outside every optimisation profile of the engine; rebuild it with "
        "`openset export tensorrt` for these sizes (or serve them with the onnxruntime runtime)"
    )


class TrtRunner:
    """One deserialised engine with its execution context."""

    def __init__(self, path: Path, device: str = "cuda") -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise RuntimeError("the tensorrt runtime needs TensorRT (the `tensorrt` extra) and CUDA") from exc
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt runtime needs a CUDA device and a CUDA build of torch")
        self.trt, self.torch = trt, torch
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        trt_logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(trt_logger, "")
        self.engine = trt.Runtime(trt_logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: not a TensorRT engine of this TensorRT version / GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.profiles: list[Bounds] = []
        for k in range(self.engine.num_optimization_profiles):
            bounds = {}
            for name in self.inputs:
                low, _, high = self.engine.get_tensor_profile_shape(name, k)
                bounds[name] = (tuple(low), tuple(high))
            self.profiles.append(bounds)
        self.stream = torch.cuda.Stream(self.device)
        self.dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
        }

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        profile = pick_profile({n: tuple(feeds[n].shape) for n in self.inputs}, self.profiles)
        self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
        keep = []
        for name in self.inputs:
            dtype = self.dtypes[self.engine.get_tensor_dtype(name)]
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device, dtype)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = {}
        for name in self.outputs:
            dtype = self.dtypes[self.engine.get_tensor_dtype(name)]
            tensor = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, tensor.data_ptr())
            outputs[name] = tensor
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        result = {}
        for name, tensor in outputs.items():
            if tensor.dtype == torch.float16:
                tensor = tensor.float()
            result[name] = tensor.cpu().numpy()
        return result
