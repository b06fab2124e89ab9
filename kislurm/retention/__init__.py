"""kislurm.retention: scoring probes and recording retention in HDF5 stores."""
