"""The parallel machinery: meshes and logical-axis rules (`sharding`), several processes
(`distributed`), reading compiled programs (`hlo`), and ahead-of-time compiles for TPU and GPU
topologies from a CPU machine (`aot`, `python -m moejax.training.aot`)."""
