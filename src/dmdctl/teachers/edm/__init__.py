"""NVlabs EDM teachers: the kind, its networks (rebuilt as dmdctl's own) and the pickle reader."""
