//! `tunestudio chat`: an interactive conversation on the terminal. Each line is a user turn; the
//! answer streams as it is made, and the conversation so far stays in the cache, so a turn only
//! runs its new tokens. Lines starting with `/` are commands (`/help`).

use std::io::{BufRead, Write};
use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};
use crate::generate::StreamEvent;
use crate::generate::conversation::{Answerers, Conversation};

use super::generate::{ModelArgs, SamplingArgs, load_options, summary};

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Answer every turn with the fine-tuned and the base model side by side.
    #[arg(long)]
    pub compare: bool,
}

const HELP: &str = "commands: /reset (new conversation), /system TEXT, /base (answer without the adapter), \
/tuned (with it), /compare (both), /stats (speed of the last answer), /exit";

pub fn run(a: &ChatArgs) -> Result<()> {
    let opts = load_options(&a.model, 2)?;
    let mut chat = crate::generate::open(&opts)?;
    let adapter = chat.has_adapter();
    let mut who = if a.compare { Answerers::Both } else { Answerers::Tuned };
    if who == Answerers::Both && !adapter {
        return Err(Error::arg("--compare", "it needs an adapter: give a run folder or --adapter"));
    }
    let params = a.sampling.params();
    params.validate()?;
    let mut conversation = Conversation::new(a.system.clone());
    let mut last_stats = String::new();
    eprintln!("{} on {}{}. {HELP}", opts.model.display(), chat.device().name, if adapter { " with the adapter" } else { " (no adapter)" });
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::op("reading the terminal", e))?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    conversation.clear();
                    chat.reset()?;
                    eprintln!("(new conversation)");
                }
                "system" => {
                    conversation = Conversation::new(Some(rest.to_string()));
                    eprintln!("(system message set; new conversation)");
                }
                "base" | "tuned" | "compare" if !adapter => eprintln!("(no adapter loaded: the base model answers)"),
                "base" => who = Answerers::Base,
                "tuned" => who = Answerers::Tuned,
                "compare" => who = Answerers::Both,
                "stats" => eprintln!("{last_stats}"),
                _ => eprintln!("{HELP}"),
            }
            continue;
        }
        let reqs = conversation.requests(line, who, &params, &a.sampling.stop);
        let cancel = AtomicBool::new(false);
        let mut out = std::io::stdout().lock();
        let streaming = reqs.len() == 1;
        let answers = chat.generate(&reqs, &cancel, &mut |e| {
            if let (true, StreamEvent::Token { text, .. }) = (streaming, &e) {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        });
        drop(out);
        let answers = match answers {
            Ok(a) => a,
            Err(e) => {
                // The turn is not kept; the conversation goes on.
                eprintln!("error: {e}");
                continue;
            }
        };
        if streaming {
            println!();
        } else {
            for (label, ans) in ["fine-tuned", "base"].iter().zip(&answers) {
                println!("── {label} ──\n{}", ans.text);
            }
        }
        let texts: Vec<String> = answers.iter().map(|a| a.text.clone()).collect();
        conversation.push(line, who, &texts);
        last_stats = summary(&answers[0], &chat.device().name, "answer".into());
    }
    Ok(())
}
