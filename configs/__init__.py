"""The default configs of every method (``<method>.yaml``), of T2UE generator training
(``t2ue-train.yaml``) and the class groupings of ``protect verify --relabel coarse:NAME``
(``relabel/<NAME>.yaml``). Shipped inside the package as ``protect.configs`` and read through
``importlib.resources`` (see :mod:`protect.config`)."""
