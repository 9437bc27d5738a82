"""transformers 5 without torchvision: its notice that an image processor name stands for the PIL class, left out.

Importing diffusers' pipelines makes transformers print, once per name, "`CLIPImageProcessor` requires torchvision
(not installed); falling back to `CLIPImageProcessorPil`…", and the same for `SiglipImageProcessor` and
`Siglip2ImageProcessor`: in transformers 5 those names mean the torchvision backend, and each pipeline module
imports them whether or not a model uses them (`pipeline_stable_diffusion.py` imports CLIP's, `loaders/ip_adapter.py`
Siglip's, and `AutoPipelineForText2Image` imports every pipeline it maps, `z_image`'s with Siglip2's). Backdrop
uses none of them (its own processor is `SegformerImageProcessorPil`, imported by that name); torchvision stays out
on purpose (installing it would replace torch), and importing fewer pipelines cannot help, as Stable Diffusion's own
module names two. So exactly that notice is left out, from the one transformers logger that writes it
(`transformers.utils.import_utils`, `_LazyModule.__getattr__`), while diffusers is imported; any other message goes
on, and transformers still hands out the PIL classes as it says.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

LOGGER = "transformers.utils.import_utils"
NOTICE = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
)


def _not_the_notice(record: logging.LogRecord) -> bool:
    return NOTICE.match(record.getMessage()) is None


@contextlib.contextmanager
def without_fallback_notices() -> Iterator[None]:
    """Leave out transformers' torchvision fallback notices for the length of the block (an import of diffusers).

    transformers says each one once per process (`warning_once`): one left out here is not said later either.
    """
    logger = logging.getLogger(LOGGER)
    logger.addFilter(_not_the_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_notice)
