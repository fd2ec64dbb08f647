"""The job server's request and response bodies (pydantic models; they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Override = Annotated[str, Field(max_length=10_000, description="`node.input=value` (value read as YAML)")]


class SubmitRequest(BaseModel):
    """A workflow to run: ``workflow`` (YAML text) or ``workflow_png`` (a dagfusion PNG, base64)."""

    model_config = ConfigDict(extra="forbid")

    workflow: str | None = Field(None, description="the workflow's YAML text")
    workflow_png: str | None = Field(None, description="a PNG written by dagfusion, base64-encoded")
    name: str = Field("workflow.yaml", max_length=200, description="what problems name as the source")
    overrides: list[Override] = Field(default_factory=list, max_length=1000)
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; equal priorities run in order")
    submitter: str | None = Field(None, max_length=100, description="who submits (default: the X-Dagfusion-Submitter header)")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: a GPU when the server has one")


class JobOut(BaseModel):
    """A job as the server shows it."""

    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    priority: int
    submitter: str
    name: str
    overrides: list[str]
    device: str
    points: int = Field(description="runs in the job (its sweep's points)")
    slot: str | None = Field(description="where it runs or ran")
    attempts: int
    interruptions: int = Field(description="times the server stopped while it ran")
    cancel_requested: bool
    error: str | None
    result: Any = Field(description="per run: run_id, status, output_dir, seconds, errors")
    output_dir: str
    event_count: int
    created: float
    started: float | None
    finished: float | None
    seq: int = Field(0, description="the job's number: submissions are numbered in order")


class JobList(BaseModel):
    jobs: list[JobOut]
    total: int = Field(description="jobs matching the filters")
    offset: int
    next_offset: int | None = Field(description="offset of the next page, null on the last")


class OutputFile(BaseModel):
    name: str = Field(description="path relative to the job's folder")
    size: int
    modified: float


class OutputList(BaseModel):
    job_id: str
    files: list[OutputFile]


class ProblemOut(BaseModel):
    code: str
    message: str
    node: str | None = None
    input: str | None = None
    line: int | None = None


class ErrorOut(BaseModel):
    """Every refusal (RFC 9457 problem details, with the field concerned)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    field: str | None = None
    errors: list[dict[str, Any]] = Field(default_factory=list, description="each malformed field and why")
    problems: list[ProblemOut] = Field(default_factory=list, description="an invalid workflow's problems")


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    queued: int
    running: int
