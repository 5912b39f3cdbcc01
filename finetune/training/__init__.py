"""What every task's training shares: trainer arguments, callbacks, the plan and the files a run writes."""
