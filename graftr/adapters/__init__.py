"""Built-in adapter kinds. Importing this package registers them (see :mod:`graftr.registry`)."""

from graftr.adapters import ia3  # noqa: F401
from graftr.adapters import ina  # noqa: F401
from graftr.adapters import gated_prompt  # noqa: F401
from graftr.adapters import scale_bias  # noqa: F401
