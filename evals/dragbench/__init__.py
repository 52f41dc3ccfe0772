"""DragBench (DragDiffusion) and Drag100 (GoodDrag) evaluation: loaders, the field's metrics, a resumable runner
and reports in the paper's table layout (Tab. 4 Mean Distance, Tab. 5 GScore)."""
