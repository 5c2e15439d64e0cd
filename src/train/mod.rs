//! Training runs: recipes and their resolved configuration, the loop, its console output.

pub mod config;
pub mod console;
pub mod optimizer;
pub mod run;
pub mod settings;
pub mod tensorboard;
pub mod trainer;

pub use config::{OptimizerConfig, Recipe, TrainConfig};
pub use console::Console;
pub use run::{InitWeights, Position, Resume, Start, Stop, TrainOutcome, eval_split, load_resume, train, train_ranks};
pub use settings::Settings;
