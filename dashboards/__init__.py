"""The analyst dashboard (Panel + Datashader); it reads runs only through ``storage``."""
