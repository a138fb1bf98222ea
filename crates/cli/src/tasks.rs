//! `ferry task ...` and `ferry net ...`: tasks, bridges.

use super::*;

#[derive(Subcommand, Debug)]
pub enum TaskCmd {
    List,
    Show {
        id: String,
    },
    /// Wait for a task to end.
    Wait {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    #[command(subcommand)]
    Bridge(BridgeCmd),
}

#[derive(Subcommand, Debug)]
pub enum BridgeCmd {
    List,
    /// Create a Linux bridge on the daemon's host.
    Create {
        name: String,
    },
}

pub(crate) async fn task(c: &Client, g: &Global, cmd: TaskCmd) -> Result<()> {
    match cmd {
        TaskCmd::List => {
            let tasks: Vec<Task> = c.get("/api/v1/tasks").await?;
            if g.json {
                return print_json(&tasks);
            }
            let mut t = table(&["ID", "KIND", "TARGET", "STATE", "PROGRESS", "ERROR"]);
            for k in tasks {
                t.add_row(vec![
                    k.id,
                    k.kind,
                    k.target,
                    format!("{:?}", k.state).to_lowercase(),
                    format!("{:.0}%", k.progress * 100.0),
                    k.error.unwrap_or_default(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        TaskCmd::Show { id } => print_json(&c.get::<Task>(&format!("/api/v1/tasks/{id}")).await?),
        TaskCmd::Wait { id } => {
            let t = c.wait_task(TaskAccepted { task: id }, g.json).await?;
            print_json(&t)
        }
    }
}
