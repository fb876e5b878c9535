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
    feature_maps: dict[str, FeatureMap] | None = Field(
        None, description="Conv layer activations for this image (only with feature_maps=true)."
    )
    embedding: list[float] | None = Field(None, description="Penultimate layer (only with feature_maps=true).")


class BatchItem(BaseModel):
    index: int = Field(description="Position in the request.")
    filename: str | None = None
    label: str | None = None
    class_id: int | None = None
    probabilities: list[float] | None = None
    top_k: list[ClassScore] | None = None
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


class ModelList(BaseModel):
    models: list[ModelInfo]
