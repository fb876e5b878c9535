"""Response bodies of the friendly REST API, with examples for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(examples=["image could not be decoded: cannot identify image file"])


class ClassScore(BaseModel):
    label: str = Field(examples=["Ankle boot"])
    class_id: int = Field(ge=0, examples=[9])
    probability: float = Field(ge=0, le=1, examples=[0.987])


OOD_SCORE = Field(
    None,
    description="How unlike the training images this input is: the Mahalanobis distance of its (square-rooted) "
    "embedding to the nearest class. Present when the model version serves an out-of-distribution score.",
    examples=[9.8],
)
IN_DISTRIBUTION = Field(
    None,
    description="False when `ood_score` is above the model's threshold (which 95 % of validation images pass): "
    "the input does not look like a garment of the training set, whatever its label says.",
    examples=[True],
)


class FeatureMap(BaseModel):
    shape: list[int] = Field(description="[height, width, channels]", examples=[[28, 28, 32]])
    data: list[Any] = Field(description="Activations nested as [height][width][channels].")


class Prediction(BaseModel):
    model: str = Field(examples=["fashion-mnist-cnn"])
    model_version: str = Field(examples=["1"])
    label: str = Field(examples=["Ankle boot"])
    class_id: int = Field(examples=[9])
    probabilities: list[float] = Field(description="Softmax probabilities in class-id order (sum to 1).")
    top_k: list[ClassScore]
    ood_score: float | None = OOD_SCORE
    in_distribution: bool | None = IN_DISTRIBUTION
    feature_maps: dict[str, FeatureMap] | None = Field(
        None, description="Conv layer activations for this image (only with feature_maps=true)."
    )
    embedding: list[float] | None = Field(None, description="Penultimate layer (only with feature_maps=true).")
    input: FeatureMap | None = Field(
        None, description="The preprocessed 28×28×1 input the model was given, in [0, 1] (only with input=true)."
    )


class BatchItem(BaseModel):
    index: int = Field(description="Position in the request.")
    filename: str | None = None
    label: str | None = None
    class_id: int | None = None
    probabilities: list[float] | None = None
    top_k: list[ClassScore] | None = None
    ood_score: float | None = OOD_SCORE
    in_distribution: bool | None = IN_DISTRIBUTION
    error: str | None = Field(None, description="Why this image failed; the others are unaffected.")
    status: int | None = Field(None, description="The HTTP status this error would have had alone.")


class BatchPrediction(BaseModel):
    model: str
    model_version: str
    count: int
    failed: int
    results: list[BatchItem]


class ProvidersInfo(BaseModel):
    requested: list[str]
    in_use: list[str]
    available: list[str]
    warnings: list[str]


class ModelInfo(BaseModel):
    name: str
    version: str
    versions: list[str]
    classes: list[str]
    input: dict[str, Any]
    outputs: list[dict[str, Any]]
    providers: ProvidersInfo
    metrics: dict[str, Any]
    parameters: int | None = None
    created: str | None = None
    explanations: list[str] = Field(
        default_factory=list, description="The `method`s POST /v1/explain offers for this version."
    )
    out_of_distribution: dict[str, Any] | None = Field(
        None, description="How `ood_score` is computed and its threshold (absent: no OOD score is served)."
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class Explanation(BaseModel):
    method: str = Field(examples=["gradcam"])
    class_id: int = Field(description="The class explained.", examples=[9])
    label: str = Field(examples=["Ankle boot"])
    target: str = Field(
        description="What the map measures: `logit` (Grad-CAM: the class's score before the softmax) or "
        "`probability` (occlusion: the drop of the class's probability)."
    )
    layer: str | None = Field(None, description="Grad-CAM: the conv layer explained.", examples=["conv3"])
    patch: int | None = Field(None, description="Occlusion: the patch's side in pixels.")
    stride: int | None = Field(None, description="Occlusion: pixels between patches.")
    baseline: float | None = Field(None, description="Occlusion: the value a patch is filled with (background).")
    shape: list[int] = Field(examples=[[28, 28]])
    data: list[list[float]] = Field(description="The attribution of each pixel of the preprocessed input, [28][28].")


class ExplanationResponse(Prediction):
    explanation: Explanation
