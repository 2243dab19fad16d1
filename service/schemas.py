"""Request fields and response shapes of REST API v1 (pydantic), and their OpenAPI request bodies.

Bodies arrive as `multipart/form-data` (an `image` file plus form fields) or `application/json` (the
image base64 encoded). Both are parsed into the same field models below; the image bytes are handled
apart so the models stay small and every field error is a 422.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _name_list(value: Any) -> Any:
    """A JSON list, a JSON list in a string, or a comma-separated string -> list of names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list ({exc.msg})") from None
        return [part for part in text.split(",")]
    return value


def _text_list(value: Any) -> Any:
    """A list of texts; a single string is a list of one."""
    if isinstance(value, str):
        return _name_list(value) if value.strip().startswith("[") else [value]
    return value


NameList = Annotated[list[str], BeforeValidator(_name_list)]
TextList = Annotated[list[str], BeforeValidator(_text_list)]
MaskFormat = Literal["rle", "png", "polygon"]
Timeout = Annotated[
    float | None, Field(None, gt=0, description="Seconds; lowers the server's deadline for this request.")
]
ModelName = Annotated[str | None, Field(None, description="Model name; defaults to the loaded model.")]
Threshold = Annotated[
    float | None, Field(None, ge=0, le=1, description="Score threshold; unset: model default.")
]


class Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentFields(Fields):
    vocabulary: NameList = Field(description="Class names: comma-separated, or a JSON list.")
    task: Literal["panoptic", "semantic", "instance"] = "panoptic"
    stuff: NameList = Field(
        default_factory=list, description="Vocabulary names to treat as stuff (panoptic)."
    )
    model: ModelName = None
    mask_format: MaskFormat = "rle"
    threshold: Threshold = None
    timeout: Timeout = None


class DetectFields(Fields):
    vocabulary: NameList = Field(description="Class names: comma-separated, or a JSON list.")
    max_detections: int = Field(100, ge=1, le=300, description="At most this many boxes, best first.")
    model: ModelName = None
    threshold: Threshold = None
    timeout: Timeout = None


class ReferFields(Fields):
    phrase: str = Field(description="The referring expression.")
    multi: bool = Field(False, description="False: the best match; true: every match above the threshold.")
    model: ModelName = None
    mask_format: MaskFormat = "rle"
    threshold: Threshold = None
    timeout: Timeout = None


MAX_CAPTION_BEAMS = 16  # bound of a request's beams (8 beams cost about 2.5 greedy decodes, 16 about 4)


class CaptionFields(Fields):
    beams: int = Field(
        1,
        ge=1,
        le=MAX_CAPTION_BEAMS,
        description="1: greedy decoding (the official one). More: beam search with this many beams; of "
        "its captions the one with the best likelihood plus image-text score. Torch runtime only.",
    )
    model: ModelName = None
    timeout: Timeout = None


class RetrieveFields(Fields):
    texts: TextList = Field(description="Texts to rank against the images.")
    model: ModelName = None
    timeout: Timeout = None


class EmbedFields(Fields):
    texts: TextList = Field(default_factory=list, description="Texts to embed (or send images).")
    model: ModelName = None
    timeout: Timeout = None


# -- responses -------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["The image could not be read (cannot identify image file)."])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageSize(BaseModel):
    width: int
    height: int


class Rle(BaseModel):
    size: list[int] = Field(description="[height, width]", examples=[[480, 640]])
    counts: str = Field(description="COCO compressed RLE counts.", examples=["Ya05d;2N2N1O1O..."])


Mask = Rle | str | list[list[float]]
MASK_DESCRIPTION = "rle: COCO RLE; png: base64 1-bit PNG; polygon: list of [x1, y1, x2, y2, ...] outlines."
BOX_DESCRIPTION = (
    "[x, y, w, h] in pixels of the original image: from the model's box head where it has one "
    "(sub-pixel, clipped to the image), else the mask's bounding box (whole pixels)."
)
TIMINGS_DESCRIPTION = (
    "Milliseconds: text (embedding lookup), queue, decode, inference (the batch), postprocess, "
    "worker (decode + inference + postprocess) and total (in the gateway)."
)


class SegmentOut(BaseModel):
    id: int
    label: str
    label_index: int = Field(description="Index into the request's vocabulary.")
    score: float
    isthing: bool
    bbox: list[float] = Field(description=BOX_DESCRIPTION)
    area: int
    mask: Mask = Field(description=MASK_DESCRIPTION)


class SegmentResponse(BaseModel):
    model: str
    task: str
    image: ImageSize
    segments: list[SegmentOut]
    timings_ms: dict[str, float] = Field(description=TIMINGS_DESCRIPTION)


class DetectionOut(BaseModel):
    label: str
    label_index: int = Field(description="Index into the request's vocabulary.")
    score: float
    bbox: list[float] = Field(description=BOX_DESCRIPTION)


class DetectResponse(BaseModel):
    model: str
    image: ImageSize
    detections: list[DetectionOut] = Field(description="Best first.")
    timings_ms: dict[str, float] = Field(description=TIMINGS_DESCRIPTION)


class MatchOut(BaseModel):
    score: float
    bbox: list[int]
    area: int
    mask: Mask = Field(description=MASK_DESCRIPTION)


class ReferResponse(BaseModel):
    model: str
    phrase: str
    image: ImageSize
    matches: list[MatchOut]
    timings_ms: dict[str, float] = Field(description=TIMINGS_DESCRIPTION)


class CaptionResponse(BaseModel):
    model: str
    caption: str
    timings_ms: dict[str, float] = Field(description=TIMINGS_DESCRIPTION)


class RetrieveResponse(BaseModel):
    model: str
    scores: list[list[float]] = Field(description="(images x texts) similarity scores.")
    text_to_image: list[list[int]] = Field(description="Per text, image indices from best to worst.")
    image_to_text: list[list[int]] = Field(description="Per image, text indices from best to worst.")
    timings_ms: dict[str, float] = Field(description=TIMINGS_DESCRIPTION)


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]] = Field(description="One normalised embedding per input.")
    timings_ms: dict[str, float] = Field(description=TIMINGS_DESCRIPTION)


class ModelOut(BaseModel):
    name: str
    model_id: str | None
    tasks: list[str]
    runtime: str
    device: str
    info: dict[str, Any] = Field(description="The model's own description (input sizes, embedding size...).")
    workers: int


class ModelsResponse(BaseModel):
    models: list[ModelOut]


class ReadyResponse(BaseModel):
    ready: bool
    workers_ready: int
    workers: int
    draining: bool


# -- OpenAPI request bodies ------------------------------------------------------------------------

IMAGE_B64 = {"type": "string", "format": "byte", "description": "The image (JPEG, PNG, WebP, BMP), base64."}
IMAGE_FILE = {"type": "string", "format": "binary", "description": "The image file (JPEG, PNG, WebP, BMP)."}


def request_body(fields: type[BaseModel], images: str | None, example: dict, required: bool = True) -> dict:
    """`openapi_extra` describing a body that is either JSON (base64 images) or multipart (files).

    `images` is "image" (one image), "images" (a list) or None (no image field).
    """
    schema = fields.model_json_schema()
    schema.pop("title", None)

    def with_images(image_schema: dict) -> dict:
        body = json.loads(json.dumps(schema))
        if images == "image":
            body["properties"] = {"image": image_schema, **body["properties"]}
            body["required"] = ["image", *body.get("required", [])] if required else body.get("required", [])
        elif images == "images":
            body["properties"] = {"images": {"type": "array", "items": image_schema}, **body["properties"]}
        return body

    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": with_images(IMAGE_B64), "example": example},
                "multipart/form-data": {"schema": with_images(IMAGE_FILE)},
            },
        }
    }
