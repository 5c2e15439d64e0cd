//! Training runs, in the order a run lives them: its settings ([`settings`]) resolved on a
//! recipe ([`config`]) into a plan ([`plan`]); the trainer that steps the model ([`trainer`])
//! driven by the loop ([`run`]), which tells its observers ([`observer`]) each event: the
//! console ([`console`]), and the run folder's metrics log and checkpointer ([`folder`]).

pub mod config;
pub mod console;
pub mod folder;
pub mod observer;
pub mod optimizer;
pub mod plan;
pub mod run;
pub mod settings;
pub mod state;
pub mod tensorboard;
pub mod trainer;

pub use config::{Lookahead, OptimizerConfig, Recipe, Reduction, TrainConfig};
pub use console::Console;
pub use folder::load_resume;
pub use observer::{EpochEnd, Observer, RunState, StepLog};
pub use run::{eval_split, train, train_ranks};
pub use settings::Settings;
pub use state::{InitWeights, Position, Resume, RunPlan, Start, Stop, TrainOutcome};
