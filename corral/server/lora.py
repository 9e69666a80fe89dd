"""Runtime LoRA adapters, vLLM's routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter
with {"lora_name", "lora_path"} bodies (behind the API key like every route but /health)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from corral.errors import CorralError
from corral.server.errors import ApiError

router = APIRouter()


class LoadLoRABody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLoRABody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str | None = None


def _engine(request: Request):
    engine = request.app.state.serving.engine
    if not hasattr(engine, "load_lora"):
        raise ApiError(400, "this engine does not serve LoRA adapters")
    return engine


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRABody, request: Request):
    s = request.app.state.serving
    if not body.lora_name.strip():
        raise ApiError(400, "lora_name is empty", param="lora_name")
    if body.lora_name in s.model_names:
        raise ApiError(400, f"`{body.lora_name}` is the base model's name", param="lora_name")
    try:
        info = await _engine(request).load_lora(body.lora_name, body.lora_path)
    except CorralError as e:
        raise ApiError(400, str(e), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully "
                             f"(rank {info['rank']}, {info['bytes'] / 2**20:.1f} MiB).")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRABody, request: Request):
    try:
        await _engine(request).unload_lora(body.lora_name)
    except CorralError as e:
        raise ApiError(404 if "not loaded" in str(e) and "enabled" not in str(e) else 400,
                       str(e), param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/v1/lora_adapters")
async def list_lora_adapters(request: Request):
    """Corral's own listing: name, path, rank, bytes, resident."""
    return JSONResponse({"data": request.app.state.serving.engine.info.get("loras", [])})
