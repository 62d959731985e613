//! `tunestudio chat`: an interactive conversation on the terminal. Each line is a user turn; the
//! answer streams as it is made, and the conversation so far stays in the cache, so a turn only
//! runs its new tokens. Lines starting with `/` are commands (`/help`).

use std::io::{BufRead, Write};
use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};
use crate::generate::{Prompt, Request, StreamEvent};
use crate::model::chat_template::Message;

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

/// Who answers the next turn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Tuned,
    Base,
    Compare,
}

pub fn run(a: &ChatArgs) -> Result<()> {
    let opts = load_options(&a.model, 2)?;
    let mut chat = crate::generate::open(&opts)?;
    let adapter = chat.has_adapter();
    let mut mode = if a.compare { Mode::Compare } else { Mode::Tuned };
    if mode == Mode::Compare && !adapter {
        return Err(Error::msg("--compare needs an adapter: give a run folder or --adapter"));
    }
    let params = a.sampling.params();
    params.validate()?;
    let mut system = a.system.clone();
    // One history per answering model: side by side, each continues its own answers.
    let mut histories: [Vec<Message>; 2] = [Vec::new(), Vec::new()];
    let mut last_stats = String::new();
    eprintln!("{} on {}{}. {HELP}", opts.model.display(), chat.device().name, if adapter { " with the adapter" } else { " (no adapter)" });
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::msg(format!("reading the terminal: {e}")))?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    histories = [Vec::new(), Vec::new()];
                    chat.reset()?;
                    eprintln!("(new conversation)");
                }
                "system" => {
                    system = Some(rest.to_string()).filter(|s| !s.trim().is_empty());
                    histories = [Vec::new(), Vec::new()];
                    eprintln!("(system message set; new conversation)");
                }
                "base" | "tuned" | "compare" if !adapter => eprintln!("(no adapter loaded: the base model answers)"),
                "base" => mode = Mode::Base,
                "tuned" => mode = Mode::Tuned,
                "compare" => mode = Mode::Compare,
                "stats" => eprintln!("{last_stats}"),
                _ => eprintln!("{HELP}"),
            }
            continue;
        }
        let with_system = |h: &Vec<Message>| {
            let mut m: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
            m.extend(h.iter().cloned());
            m
        };
        for h in histories.iter_mut() {
            h.push(Message::new("user", line));
        }
        let mut reqs = Vec::new();
        let adapters: &[bool] = match mode {
            Mode::Tuned => &[true],
            Mode::Base => &[false],
            Mode::Compare => &[true, false],
        };
        for (i, &on) in adapters.iter().enumerate() {
            let h = if mode == Mode::Compare { &histories[i] } else { &histories[0] };
            reqs.push(Request {
                prompt: Prompt::Chat(with_system(h)),
                adapter: on,
                params: params.clone(),
                stop_strings: a.sampling.stop.clone(),
                ignore_eos: false,
            });
        }
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
                for h in histories.iter_mut() {
                    h.pop();
                }
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
        for (i, ans) in answers.iter().enumerate() {
            let h = if mode == Mode::Compare { &mut histories[i] } else { &mut histories[0] };
            h.push(Message::new("assistant", ans.text.clone()));
        }
        if mode != Mode::Compare {
            // The single history is the one both modes continue from.
            histories[1] = histories[0].clone();
        }
        last_stats = summary(&answers[0], &chat.device().name, "answer".into());
    }
    Ok(())
}
