"""Guest images corral can boot: the freestanding probe test kernel (built from corral/guest/ with
the host's gcc, see corral.images.probe) and Debian kernels fetched into corral's cache."""
