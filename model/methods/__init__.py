"""The pre-training methods, one file each, registered by name.

A method is a common.Method (an nn.Module) with `name`, `spec(cfg) ->
ViewSpec` (static), `__init__(cfg)`, `forward(views) -> (loss, metrics)`,
`epoch_start(epoch, loader)`, `step_end(progress)` (both no-ops unless
overridden) and a `backbone` attribute (the online backbone).
"""
from .byol import BYOL
from .clim import CLIM
from .cossl import COSSL
from .leoclr import LeOCLR
from .mocov2 import MoCoV2
from .mosrep import MosRep
from .multicrop import MultiCrop, MultiCropMosRep
from .scrl import SCRL
from .simclr import SimCLR

METHODS = {"mocov2": MoCoV2, "byol": BYOL, "simclr": SimCLR}
METHODS.update(multicrop=MultiCrop, multicrop_mosrep=MultiCropMosRep, mosrep=MosRep, leoclr=LeOCLR)
METHODS.update(scrl=SCRL, clim=CLIM, cossl=COSSL)
