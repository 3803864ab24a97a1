"""The Hugging Face preflight every target runs first: token, revision, gated access, fits the GPU."""

from __future__ import annotations

from pydantic import SecretStr

from manifests.errors import PreflightError
from manifests.spec import DeploymentSpec, check_fit, check_fit_all, fit_fix
from tasks import hf


def hub_preflight(spec: DeploymentSpec, token: SecretStr) -> hf.HubModel:
    hf.check_hf_token(token=token)
    model = hf.get_model(model_id=spec.model.id, revision=spec.model.revision, token=token)
    if model.gated:
        hf.check_gated_access(model_id=spec.model.id, token=token)
    if model.params:
        fit = check_fit(spec, model.params)
        if not fit.fits:
            raise PreflightError(fit.message(spec), fit_fix(spec, fit))
        for i, opt, fit in check_fit_all(spec, model.params)[1:]:  # each capacity option must hold it too
            if not fit.fits:
                raise PreflightError(f"capacity[{i}]: {fit.message(spec, option=opt)}",
                                     fit_fix(spec, fit, option=opt, where=f"capacity[{i}]"))
    return model
