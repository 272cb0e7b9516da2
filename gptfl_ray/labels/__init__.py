"""Step 1a: private label collection (IBLT sketches summed under secure aggregation).

- :mod:`~gptfl_ray.labels.iblt` invertible Bloom lookup tables over ``GF(2^61 - 1)``
- :mod:`~gptfl_ray.labels.ring` modular vectors, the mask PRG, fixed-point quantisation
- :mod:`~gptfl_ray.labels.shamir` Shamir secret sharing
- :mod:`~gptfl_ray.labels.secagg` the SecAgg protocol (Bonawitz et al. 2017) as client/server state machines
- :mod:`~gptfl_ray.labels.secagg_ray` the :class:`SecAggHost` actor mixin and the Ray driver :func:`secure_sum`
- :mod:`~gptfl_ray.labels.collect` ``gptfl collect-labels`` (imports Ray; import it explicitly)
"""

from gptfl_ray.labels.iblt import IBLT, IBLTDecodeError
from gptfl_ray.labels.ring import (
    Ring,
    decode_weighted,
    dequantize,
    encode_weighted,
    fixed_point_scale,
    quantize,
)
from gptfl_ray.labels.secagg import SecAggError, SecAggParams, SecAggResult, secure_sum_local
from gptfl_ray.labels.secagg_ray import SecAggHost, secure_sum

__all__ = [
    "IBLT",
    "IBLTDecodeError",
    "Ring",
    "SecAggError",
    "SecAggHost",
    "SecAggParams",
    "SecAggResult",
    "decode_weighted",
    "dequantize",
    "encode_weighted",
    "fixed_point_scale",
    "quantize",
    "secure_sum",
    "secure_sum_local",
]
