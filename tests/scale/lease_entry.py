"""``python -m applications.lease.search`` for the tests, run under torchrun: every process also
dumps its final parameters (explainer weights and architecture, bank, audience) to
``<out>/params-rank<r>.pt`` so the test can compare the replicas."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import mlo  # noqa: E402
from applications.lease import outputs, search  # noqa: E402

_finish = outputs.finish


def _dump_then_finish(cfg, out, space, explainer, audience, bank, *args, **kwargs):
    params = {f"explainer/{k}": v.detach().cpu() for k, v in explainer.named_parameters()}
    if audience is not None:
        params.update({f"audience/{k}": v.detach().cpu() for k, v in audience.named_parameters()})
        params["explanation/bank"] = bank.detach().cpu()
    torch.save(params, os.path.join(out, f"params-rank{mlo.distributed.rank()}.pt"))
    return _finish(cfg, out, space, explainer, audience, bank, *args, **kwargs)


outputs.finish = _dump_then_finish

if __name__ == "__main__":
    sys.exit(search.main())
