"""An estimate asked for by names (a model, devices, links, lengths): what `shardwise
estimate` and the dashboard's estimate form both run, so they always agree."""

from __future__ import annotations

from contextlib import suppress

from pydantic import BaseModel, ConfigDict

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec
from shardwise.perf.estimate import Deployment, Draft, Estimate, estimate
from shardwise.perf.hardware import DeviceSpec, canonical_dtype, load_device, load_link, profile_link
from shardwise.perf.operators import Precision

DEFAULT_PIPELINE_LINK = "ethernet-10g"  # between pipeline stages that no profile measured


class EstimateQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str  # a catalog name, .gguf file, or HF config.json / model directory
    device: str | None = None  # a catalog device or a `shardwise profile` file
    tp: int = 1  # tensor-parallel devices
    ep: int = 1  # expert-parallel devices (MoE)
    tp_link: str = "nvlink4"
    pp_devices: list[str] | None = None  # pipeline stages, one device each
    link: str | None = None  # between pipeline stages (default: measured, or DEFAULT_PIPELINE_LINK)
    batch: int = 1
    input: int = 512
    output: int = 128
    quant: str | None = None
    kv_quant: str | None = None
    chunk: int | None = None
    cached: int = 0  # prompt tokens found in the prefix cache
    draft: str | None = None  # ngram, a weight format of the model's own weights (int4), or a model
    gamma: int = 4
    accept: float = 0.7  # the fraction of drafted tokens accepted
    drafting: float = 1.0  # the share of steps that draft (prompt lookup drafts where it finds a match)

    def run(self, files: bool = True) -> tuple[Estimate, DeviceSpec]:
        """The estimate, and the first stage's device (its roofline); a ShardwiseError naming
        the fix if the inputs are wrong or the model does not fit. files=False: devices are
        catalog names only (the query came from a remote user)."""
        from shardwise.model.catalog import load_spec

        spec = load_spec(self.model)
        if self.pp_devices:
            devices = [load_device(n, files) for n in self.pp_devices]
            pairs = zip(self.pp_devices, self.pp_devices[1:], strict=False)
            measured = [profile_link(a, b) if files else None for a, b in pairs]
            links = [load_link(self.link) if self.link else m or load_link(DEFAULT_PIPELINE_LINK) for m in measured]
            deployment = Deployment.pipeline(spec, devices, links)
        elif self.device:
            deployment = Deployment.single(spec, load_device(self.device, files), self.tp, self.ep,
                                           load_link(self.tp_link))
        else:
            raise ShardwiseError("give --device (one device) or --pp-devices (a pipeline), e.g. --device h100")
        first = deployment.stages[0].device
        act = first.default_dtype
        precision = Precision(self.quant or act, self.kv_quant or act, act)
        if not 0 <= self.accept <= 1 or not 0 <= self.drafting <= 1 or self.gamma < 1:
            raise ShardwiseError("--accept and --drafting must be within 0..1 and --gamma at least 1")
        draft = self._draft(spec)
        est = estimate(spec, deployment, batch=self.batch, input_tokens=self.input, output_tokens=self.output,
                       precision=precision, chunk=self.chunk, draft=draft,
                       cached_tokens=self.cached)
        if not est.fits:
            worst = max(est.stages, key=lambda s: s["memory"]["total"] / s["capacity"])
            raise ShardwiseError(
                f"{spec.name} does not fit: stage on {worst['device']} needs {worst['memory']['total'] / 1e9:.1f} GB "
                f"of its {worst['capacity'] / 1e9:.1f} GB; use more devices (--tp, --pp-devices), a smaller "
                f"--quant (e.g. int4), or a smaller --batch / --input / --output"
            )
        return est, first

    def _draft(self, spec: ModelSpec) -> Draft | None:
        from shardwise.model.catalog import load_spec

        if self.draft is None:
            return None
        if self.draft == "ngram":
            return Draft(None, self.gamma, self.accept, drafting=self.drafting)
        with suppress(ShardwiseError):  # a precision: the model's own weights in it
            return Draft(spec, self.gamma, self.accept, weights=canonical_dtype(self.draft), drafting=self.drafting)
        try:  # else a draft model
            return Draft(load_spec(self.draft), self.gamma, self.accept, drafting=self.drafting)
        except ShardwiseError as e:
            raise ShardwiseError(f"unknown drafter '{self.draft}': use ngram, a precision of the model's own "
                                 f"weights (e.g. int4) or a draft model ({e})") from None
