from .block_manager import BlockManager
from .llm_engine import EngineConfig, LLMEngine, RequestFailed, StepOutput
from .scheduler import Scheduler
from .sequence import Sequence

__all__ = ["BlockManager", "EngineConfig", "LLMEngine", "RequestFailed", "Scheduler", "Sequence", "StepOutput"]
