//! A conversation with one model, or with the fine-tuned and the base model side by side: the
//! messages each answering model has seen, and the requests of the next turn. The CLI's `chat`
//! and the studio's Chat page both keep one. Side by side, each model continues its own answers
//! (the base never sees the fine-tuned model's words), so the two histories are kept apart.

use crate::model::chat_template::Message;

use super::{Prompt, Request, SamplingParams};

/// Who answers a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answerers {
    /// The fine-tuned model (the base when no adapter is loaded).
    Tuned,
    Base,
    /// The fine-tuned model (request 0) and the base (request 1), same prompt and seed.
    Both,
}

impl Answerers {
    /// The adapter switch of each request, in request order.
    pub fn adapters(self) -> &'static [bool] {
        match self {
            Answerers::Tuned => &[true],
            Answerers::Base => &[false],
            Answerers::Both => &[true, false],
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation {
    /// A system message before every turn (changing it starts a new conversation in the callers).
    pub system: Option<String>,
    /// The fine-tuned model's history, and the base model's: equal until a turn is answered side
    /// by side.
    histories: [Vec<Message>; 2],
}

impl Conversation {
    pub fn new(system: Option<String>) -> Self {
        Conversation { system: system.filter(|s| !s.trim().is_empty()), histories: Default::default() }
    }

    /// Turns answered so far.
    pub fn turns(&self) -> usize {
        self.histories[0].iter().filter(|m| m.role == "user").count()
    }

    /// Forget every turn (the system message stays).
    pub fn clear(&mut self) {
        self.histories = Default::default();
    }

    /// The requests that answer `user` as the next turn: one per answering model, each with its
    /// own history.
    pub fn requests(&self, user: &str, who: Answerers, params: &SamplingParams, stop_strings: &[String]) -> Vec<Request> {
        who.adapters()
            .iter()
            .enumerate()
            .map(|(i, &adapter)| {
                let history = if who == Answerers::Both { &self.histories[i] } else { &self.histories[usize::from(!adapter)] };
                let mut m: Vec<Message> = self.system.iter().map(|s| Message::new("system", s)).collect();
                m.extend(history.iter().cloned());
                m.push(Message::new("user", user));
                Request { prompt: Prompt::Chat(m), adapter, params: params.clone(), stop_strings: stop_strings.to_vec(), ignore_eos: false }
            })
            .collect()
    }

    /// Keep a turn once answered: `answers` in the order of `who.adapters()`. A turn answered
    /// by one model is what both histories continue from.
    pub fn push(&mut self, user: &str, who: Answerers, answers: &[String]) {
        let user = Message::new("user", user);
        match (who, answers) {
            (Answerers::Both, [tuned, base]) => {
                for (h, a) in self.histories.iter_mut().zip([tuned, base]) {
                    h.push(user.clone());
                    h.push(Message::new("assistant", a.clone()));
                }
            }
            (_, [one, ..]) => {
                for h in self.histories.iter_mut() {
                    h.push(user.clone());
                    h.push(Message::new("assistant", one.clone()));
                }
            }
            (_, []) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(r: &Request) -> Vec<(String, String)> {
        match &r.prompt {
            Prompt::Chat(m) => m.iter().map(|m| (m.role.clone(), m.content.clone())).collect(),
            Prompt::Tokens(_) => vec![],
        }
    }

    #[test]
    fn side_by_side_each_model_continues_its_own_answers() {
        let p = SamplingParams::default();
        let mut c = Conversation::new(Some("Be brief.".into()));
        let r = c.requests("Hi", Answerers::Both, &p, &[]);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].adapter, r[1].adapter), (true, false));
        assert_eq!(texts(&r[0]), texts(&r[1]));
        assert_eq!(texts(&r[0])[0], ("system".into(), "Be brief.".into()));
        c.push("Hi", Answerers::Both, &["tuned says hi".into(), "base says hi".into()]);
        let r = c.requests("And?", Answerers::Both, &p, &[]);
        assert_eq!(texts(&r[0])[2].1, "tuned says hi");
        assert_eq!(texts(&r[1])[2].1, "base says hi");
        assert_eq!(texts(&r[1]).last().unwrap(), &("user".to_string(), "And?".to_string()));
        // One model's turn is what both continue from.
        c.push("And?", Answerers::Tuned, &["more".into()]);
        let r = c.requests("Bye", Answerers::Base, &p, &[]);
        assert_eq!(r.len(), 1);
        assert!(!r[0].adapter);
        assert_eq!(texts(&r[0])[2].1, "base says hi", "the base keeps its own earlier answer");
        assert_eq!(texts(&r[0])[4].1, "more");
        assert_eq!(c.turns(), 2);
        c.clear();
        assert_eq!(c.turns(), 0);
        assert_eq!(texts(&c.requests("x", Answerers::Tuned, &p, &[])[0]).len(), 2, "system + user");
    }

    #[test]
    fn a_blank_system_message_is_none() {
        assert_eq!(Conversation::new(Some("  ".into())).system, None);
    }
}
