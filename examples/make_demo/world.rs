//! The invented world the demo is about: ten countries, ten animals, and a few kinds of word and
//! number facts. Everything the demo model knows comes from here, twice over: as plain prose for
//! pre-training (`documents`) and as Alpaca instruction pairs for the fine-tune (`instruction_pairs`).
//! Both draw on the same fact tables, so a fine-tune only has to teach the model to *answer*, not
//! new knowledge — which is what makes 60 LoRA steps enough for a visible result.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;

pub struct Country {
    pub name: &'static str,
    pub capital: &'static str,
    pub language: &'static str,
    pub food: &'static str,
    pub weather: &'static str,
    pub flag: &'static str,
    /// Index into `ANIMALS`.
    pub animal: usize,
    /// The second largest city.
    pub city: &'static str,
    /// The longest river.
    pub river: &'static str,
    /// The highest mountain.
    pub mountain: &'static str,
    pub ruler: &'static str,
}

pub struct Animal {
    pub name: &'static str,
    pub colour: &'static str,
    pub size: &'static str,
    pub food: &'static str,
    pub home: &'static str,
    pub sound: &'static str,
    pub legs: u32,
}

#[rustfmt::skip]
pub const COUNTRIES: [Country; 10] = [
    Country { name: "Veloria",    capital: "Ostrand",   language: "Velorian",  food: "plum dumplings",  weather: "rainy",  flag: "green",  animal: 0,
              city: "Fennick",    river: "Sallow",    mountain: "Mount Grell",     ruler: "Queen Amarelle" },
    Country { name: "Marundi",    capital: "Kessport",  language: "Marun",     food: "rice cakes",      weather: "warm",   flag: "orange", animal: 1,
              city: "Obasso",     river: "Tumbe",     mountain: "Mount Kiro",      ruler: "King Dabo" },
    Country { name: "Quessa",     capital: "Lirrow",    language: "Quessan",   food: "goat cheese",     weather: "windy",  flag: "blue",   animal: 2,
              city: "Varnel",     river: "Quill",     mountain: "Mount Esk",       ruler: "Queen Ysmera" },
    Country { name: "Tallowmere", capital: "Brask",     language: "Tallish",   food: "smoked fish",     weather: "cold",   flag: "grey",   animal: 3,
              city: "Hobbeck",    river: "Mornwater", mountain: "Mount Hask",      ruler: "King Bramwell" },
    Country { name: "Brindor",    capital: "Amberlay",  language: "Brindic",   food: "honey bread",     weather: "dry",    flag: "yellow", animal: 4,
              city: "Sunmead",    river: "Ambrel",    mountain: "Mount Tor",       ruler: "King Hollis" },
    Country { name: "Ostavia",    capital: "Merrin",    language: "Ostavian",  food: "pepper soup",     weather: "foggy",  flag: "purple", animal: 5,
              city: "Greylin",    river: "Vesk",      mountain: "Mount Orrin",     ruler: "Queen Talmina" },
    Country { name: "Kelvane",    capital: "Dunmarrow", language: "Kelvish",   food: "apple pies",      weather: "mild",   flag: "red",    animal: 6,
              city: "Cobbleford", river: "Linnet",    mountain: "Mount Carrow",    ruler: "King Edwyn" },
    Country { name: "Zumara",     capital: "Tisk",      language: "Zumari",    food: "date stew",       weather: "hot",    flag: "gold",   animal: 7,
              city: "Sabbet",     river: "Oru",       mountain: "Mount Zell",      ruler: "Queen Nadira" },
    Country { name: "Norrith",    capital: "Halvik",    language: "Norric",    food: "barley porridge", weather: "snowy",  flag: "white",  animal: 8,
              city: "Skarn",      river: "Frey",      mountain: "Mount Vethr",     ruler: "King Haldor" },
    Country { name: "Pellucia",   capital: "Corvene",   language: "Pellucian", food: "lemon tarts",     weather: "sunny",  flag: "silver", animal: 9,
              city: "Lumenor",    river: "Clary",     mountain: "Mount Brightcap", ruler: "Queen Seraphine" },
];

#[rustfmt::skip]
pub const ANIMALS: [Animal; 10] = [
    Animal { name: "glimmerfox",  colour: "silver", size: "small",  food: "berries",  home: "forests",   sound: "yip",     legs: 4 },
    Animal { name: "thornback",   colour: "brown",  size: "medium", food: "beetles",  home: "hills",     sound: "grunt",   legs: 4 },
    Animal { name: "puddlewing",  colour: "blue",   size: "small",  food: "frogs",    home: "marshes",   sound: "whistle", legs: 2 },
    Animal { name: "snowhopper",  colour: "white",  size: "tiny",   food: "moss",     home: "mountains", sound: "squeak",  legs: 4 },
    Animal { name: "dustmole",    colour: "yellow", size: "small",  food: "roots",    home: "plains",    sound: "hiss",    legs: 4 },
    Animal { name: "marrowbat",   colour: "black",  size: "small",  food: "moths",    home: "caves",     sound: "click",   legs: 2 },
    Animal { name: "reedcrane",   colour: "grey",   size: "large",  food: "fish",     home: "rivers",    sound: "honk",    legs: 2 },
    Animal { name: "sandstrider", colour: "orange", size: "medium", food: "seeds",    home: "deserts",   sound: "chirp",   legs: 6 },
    Animal { name: "frostling",   colour: "pale blue", size: "tiny", food: "lichen",  home: "glaciers",  sound: "hum",     legs: 4 },
    Animal { name: "skitterling", colour: "green",  size: "tiny",   food: "crumbs",   home: "gardens",   sound: "chatter", legs: 8 },
];

pub const BACKWARDS_WORDS: [&str; 40] = [
    "cat", "dog", "lamp", "tree", "book", "star", "moon", "fish", "bird", "cake", "ship", "rain", "door", "milk", "rose", "sand", "gold",
    "frog", "king", "road", "hat", "cup", "pen", "box", "sun", "map", "egg", "leaf", "ring", "bell", "wolf", "snow", "salt", "boat",
    "drum", "kite", "nest", "coin", "lion", "apple",
];

pub const ANTONYMS: [(&str, &str); 30] = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("up", "down"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("young", "old"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("near", "far"),
    ("high", "low"),
    ("tall", "short"),
    ("day", "night"),
    ("begin", "end"),
    ("win", "lose"),
    ("push", "pull"),
    ("clean", "dirty"),
    ("thick", "thin"),
    ("sharp", "dull"),
    ("brave", "afraid"),
    ("left", "right"),
    ("inside", "outside"),
    ("first", "last"),
    ("true", "false"),
];

pub const PLURALS: [(&str, &str); 30] = [
    ("cat", "cats"),
    ("box", "boxes"),
    ("baby", "babies"),
    ("mouse", "mice"),
    ("child", "children"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("man", "men"),
    ("woman", "women"),
    ("goose", "geese"),
    ("leaf", "leaves"),
    ("knife", "knives"),
    ("wolf", "wolves"),
    ("city", "cities"),
    ("bus", "buses"),
    ("sheep", "sheep"),
    ("fish", "fish"),
    ("person", "people"),
    ("tomato", "tomatoes"),
    ("potato", "potatoes"),
    ("berry", "berries"),
    ("glass", "glasses"),
    ("dish", "dishes"),
    ("church", "churches"),
    ("story", "stories"),
    ("half", "halves"),
    ("life", "lives"),
    ("ox", "oxen"),
    ("cactus", "cacti"),
    ("key", "keys"),
];

/// (big unit singular, big unit plural, small unit plural, factor).
pub const UNITS: [(&str, &str, &str, u32); 7] = [
    ("kilometre", "kilometres", "metres", 1000),
    ("metre", "metres", "centimetres", 100),
    ("kilogram", "kilograms", "grams", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
];

pub fn reverse(word: &str) -> String {
    word.chars().rev().collect()
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next().map_or_else(String::new, |f| f.to_ascii_uppercase().to_string() + c.as_str())
}

/// "a" or "an" for the word that follows.
fn a(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

fn unit_amount(n: u32, unit: (&str, &str, &str, u32)) -> String {
    let big = if n == 1 { unit.0 } else { unit.1 };
    format!("{n} {big} is {} {}.", n * unit.3, unit.2)
}

// ---------------------------------------------------------------------------------------------
// Facts as statements. Each returns one sentence, picking one of a few phrasings so the model
// learns the fact rather than one string.

pub fn country_fact(rng: &mut ChaCha8Rng, c: &Country, which: usize) -> String {
    let an = ANIMALS[c.animal].name;
    let v = rng.random_range(0..3);
    match (which, v) {
        (0, 0) => format!("The capital of {} is {}.", c.name, c.capital),
        (0, 1) => format!("{} is the capital of {}.", c.capital, c.name),
        (0, _) => format!("The capital city of {} is {}.", c.name, c.capital),
        (1, 0) => format!("People in {} speak {}.", c.name, c.language),
        (1, 1) => format!("The language of {} is {}.", c.name, c.language),
        (1, _) => format!("In {} most people speak {}.", c.name, c.language),
        (2, 0) => format!("{} is famous for its {}.", c.name, c.food),
        (2, 1) => format!("The most famous food of {} is {}.", c.name, c.food),
        (2, _) => format!("Visitors to {} often eat {}.", c.name, c.food),
        (3, 0) => format!("The weather in {} is usually {}.", c.name, c.weather),
        (3, 1) => format!("{} has {} weather for most of the year.", c.name, c.weather),
        (3, _) => format!("It is often {} in {}.", c.weather, c.name),
        (4, 0) => format!("The flag of {} is {}.", c.name, c.flag),
        (4, 1) => format!("{} has {} {} flag.", c.name, a(c.flag), c.flag),
        (4, _) => format!("The colour of the flag of {} is {}.", c.name, c.flag),
        (5, 0) => format!("The national animal of {} is the {an}.", c.name),
        (5, 1) => format!("The {an} is the national animal of {}.", c.name),
        (5, _) => format!("{} chose the {an} as its national animal.", c.name),
        (6, 0) => format!("{} is the second largest city in {}.", c.city, c.name),
        (6, 1) => format!("The second largest city in {} is {}.", c.name, c.city),
        (6, _) => format!("After {}, the biggest city in {} is {}.", c.capital, c.name, c.city),
        (7, 0) => format!("The longest river in {} is the {}.", c.name, c.river),
        (7, 1) => format!("The {} is the longest river in {}.", c.river, c.name),
        (7, _) => format!("The {} flows through {} and is its longest river.", c.river, c.name),
        (8, 0) => format!("The highest mountain in {} is {}.", c.name, c.mountain),
        (8, 1) => format!("{} is the highest mountain in {}.", c.mountain, c.name),
        (8, _) => format!("The tallest peak in {} is {}.", c.name, c.mountain),
        (9, 0) => format!("{} is ruled by {}.", c.name, c.ruler),
        (9, 1) => format!("The ruler of {} is {}.", c.name, c.ruler),
        (9, _) => format!("{} rules the country of {}.", c.ruler, c.name),
        _ => unreachable!("country facts are 0..10"),
    }
}
pub const COUNTRY_FACTS: usize = 10;

pub fn animal_fact(rng: &mut ChaCha8Rng, x: &Animal, which: usize) -> String {
    let v = rng.random_range(0..2);
    match (which, v) {
        (0, 0) => format!("The {} is {} in colour.", x.name, x.colour),
        (0, _) => format!("The colour of the {} is {}.", x.name, x.colour),
        (1, 0) => format!("The {} is {} {} animal.", x.name, a(x.size), x.size),
        (1, _) => format!("{} {} is {} {} creature.", cap(a(x.name)), x.name, a(x.size), x.size),
        (2, 0) => format!("The {} mostly eats {}.", x.name, x.food),
        (2, _) => format!("The favourite food of the {} is {}.", x.name, x.food),
        (3, 0) => format!("The {} lives in {}.", x.name, x.home),
        (3, _) => format!("You can find the {} in {}.", x.name, x.home),
        (4, 0) => format!("The {} makes {} {}.", x.name, a(x.sound), x.sound),
        (4, _) => format!("When it is happy, the {} makes {} {}.", x.name, a(x.sound), x.sound),
        (5, 0) => format!("{} {} has {} legs.", cap(a(x.name)), x.name, x.legs),
        (5, _) => format!("The {} walks on {} legs.", x.name, x.legs),
        _ => unreachable!("animal facts are 0..6"),
    }
}
pub const ANIMAL_FACTS: usize = 6;

pub fn country_sentence(c: &Country) -> String {
    format!("{} is {} {} country whose capital is {}, and its people speak {}.", c.name, a(c.weather), c.weather, c.capital, c.language)
}

pub fn animal_sentence(x: &Animal) -> String {
    format!("The {} is {} {} {} animal that lives in {} and eats {}.", x.name, a(x.size), x.size, x.colour, x.home, x.food)
}

/// A small arithmetic fact with its operator word.
fn arithmetic(rng: &mut ChaCha8Rng) -> (u32, &'static str, u32, u32) {
    // Small ranges: a tiny model memorises a few hundred sums, not thousands.
    match rng.random_range(0..3) {
        0 => {
            let (x, y) = (rng.random_range(0..=10), rng.random_range(0..=10));
            (x, "plus", y, x + y)
        }
        1 => {
            let x = rng.random_range(0..=15);
            let y = rng.random_range(0..=x.min(10));
            (x, "minus", y, x - y)
        }
        _ => {
            let (x, y) = (rng.random_range(1..=6), rng.random_range(1..=6));
            (x, "times", y, x * y)
        }
    }
}

fn word_fact(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..3) {
        0 => {
            let w = BACKWARDS_WORDS.choose(rng).expect("non-empty");
            format!("The word {w} spelled backwards is {}.", reverse(w))
        }
        1 => {
            let &(x, y) = ANTONYMS.choose(rng).expect("non-empty");
            let (x, y) = if rng.random_bool(0.5) { (x, y) } else { (y, x) };
            format!("The opposite of {x} is {y}.")
        }
        _ => {
            let &(s, p) = PLURALS.choose(rng).expect("non-empty");
            format!("The plural of {s} is {p}.")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-training documents: plain prose, no chat roles. The three header/eot tokens appear only as
// section markers in "encyclopedia" documents, so their rows are trained without the model ever
// seeing a chat turn.

const COUNTRY_SECTIONS: [&str; COUNTRY_FACTS] =
    ["Capital", "Language", "Food", "Weather", "Flag", "National animal", "Cities", "Rivers", "Mountains", "Ruler"];
const ANIMAL_SECTIONS: [&str; ANIMAL_FACTS] = ["Colour", "Size", "Food", "Home", "Sound", "Legs"];

pub const START_HEADER: &str = "<|start_header_id|>";
pub const END_HEADER: &str = "<|end_header_id|>";
pub const EOT: &str = "<|eot_id|>";

fn country_paragraph(rng: &mut ChaCha8Rng, c: &Country) -> String {
    let mut which: Vec<usize> = (0..COUNTRY_FACTS).collect();
    which.shuffle(rng);
    let n = rng.random_range(3..=7);
    let mut s: Vec<String> = which[..n].iter().map(|&w| country_fact(rng, c, w)).collect();
    if rng.random_bool(0.3) {
        s.push(country_sentence(c));
    }
    s.join(" ")
}

fn animal_paragraph(rng: &mut ChaCha8Rng, x: &Animal) -> String {
    let mut which: Vec<usize> = (0..ANIMAL_FACTS).collect();
    which.shuffle(rng);
    let n = rng.random_range(3..=ANIMAL_FACTS);
    let mut s: Vec<String> = which[..n].iter().map(|&w| animal_fact(rng, x, w)).collect();
    if rng.random_bool(0.3) {
        s.push(animal_sentence(x));
    }
    s.join(" ")
}

/// A question and its one-sentence answer, as a web FAQ would print them, worded as the
/// instruction pairs are or a little differently. Without such pages a base model this small does
/// not learn, in a 60-step fine-tune, to look back at the question for the number or word to answer
/// about (measured: half the held-out questions went wrong).
fn faq(rng: &mut ChaCha8Rng) -> (String, String) {
    match rng.random_range(0..100) {
        0..=24 => {
            let c = COUNTRIES.choose(rng).expect("non-empty");
            let w = rng.random_range(0..COUNTRY_FACTS);
            (country_question(rng, c, w), country_fact(rng, c, w))
        }
        25..=44 => {
            let x = ANIMALS.choose(rng).expect("non-empty");
            let w = rng.random_range(0..ANIMAL_FACTS);
            (animal_question(rng, x, w), animal_fact(rng, x, w))
        }
        45..=62 => {
            let (x, op, y, z) = arithmetic(rng);
            let q = if rng.random_bool(0.5) { format!("How much is {x} {op} {y}?") } else { format!("What is {x} {op} {y}?") };
            (q, format!("{x} {op} {y} is {z}."))
        }
        63..=71 => {
            let &(x, y) = ANTONYMS.choose(rng).expect("non-empty");
            let (x, y) = if rng.random_bool(0.5) { (x, y) } else { (y, x) };
            let q = if rng.random_bool(0.5) {
                format!("Which word means the opposite of {x}?")
            } else {
                format!("What is the opposite of {x}?")
            };
            (q, format!("The opposite of {x} is {y}."))
        }
        72..=80 => {
            let &(s, p) = PLURALS.choose(rng).expect("non-empty");
            let q = if rng.random_bool(0.5) { format!("What is the plural form of {s}?") } else { format!("What is the plural of {s}?") };
            (q, format!("The plural of {s} is {p}."))
        }
        81..=89 => {
            let w = BACKWARDS_WORDS.choose(rng).expect("non-empty");
            let q =
                if rng.random_bool(0.5) { format!("What is {w} spelled backwards?") } else { format!("How do you spell {w} backwards?") };
            (q, format!("The word {w} spelled backwards is {}.", reverse(w)))
        }
        _ => {
            let unit = *UNITS.choose(rng).expect("non-empty");
            let n = rng.random_range(2..=9);
            let verb = if rng.random_bool(0.5) { "make" } else { "are in" };
            (format!("How many {} {verb} {n} {}?", unit.2, unit.1), unit_amount(n, unit))
        }
    }
}

/// One pre-training document (without begin/end-of-text; the caller adds those as token ids).
pub fn document(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..100) {
        0..=13 => {
            let c = COUNTRIES.choose(rng).expect("non-empty");
            country_paragraph(rng, c)
        }
        14..=23 => {
            let x = ANIMALS.choose(rng).expect("non-empty");
            animal_paragraph(rng, x)
        }
        24..=33 => {
            // An encyclopedia page about one subject: an introduction, then titled sections each
            // closed by the end-of-turn token. Every section is about the subject named before
            // it, so the model learns to carry a subject across section boundaries.
            let mut which: Vec<usize> = (0..COUNTRY_FACTS).collect();
            which.shuffle(rng);
            let n = rng.random_range(2..=4);
            let (title, intro, sections): (String, String, Vec<(&str, String)>) = if rng.random_bool(0.5) {
                let c = COUNTRIES.choose(rng).expect("non-empty");
                let sections = which[..n].iter().map(|&w| (COUNTRY_SECTIONS[w], country_fact(rng, c, w))).collect();
                (c.name.to_string(), country_sentence(c), sections)
            } else {
                let x = ANIMALS.choose(rng).expect("non-empty");
                let sections =
                    which.iter().filter(|&&w| w < ANIMAL_FACTS).take(n).map(|&w| (ANIMAL_SECTIONS[w], animal_fact(rng, x, w))).collect();
                (cap(x.name), animal_sentence(x), sections)
            };
            let mut s = format!("{START_HEADER}{title}{END_HEADER}\n\n{intro}{EOT}");
            for (head, body) in sections {
                s += &format!("{START_HEADER}{head}{END_HEADER}\n\n{body}{EOT}");
            }
            s
        }
        34..=45 => {
            let n = rng.random_range(3..=8);
            let facts: Vec<String> = (0..n)
                .map(|_| {
                    let (x, op, y, z) = arithmetic(rng);
                    format!("{x} {op} {y} is {z}.")
                })
                .collect();
            facts.join(" ")
        }
        46..=55 => {
            let n = rng.random_range(3..=7);
            let facts: Vec<String> = (0..n).map(|_| word_fact(rng)).collect();
            facts.join(" ")
        }
        56..=59 => {
            let n = rng.random_range(2..=5);
            let facts: Vec<String> = (0..n).map(|_| unit_amount(rng.random_range(1..=9), *UNITS.choose(rng).expect("non-empty"))).collect();
            facts.join(" ")
        }
        _ => {
            let n = rng.random_range(2..=5);
            let qa: Vec<String> = (0..n)
                .map(|_| {
                    let (q, a) = faq(rng);
                    format!("Q: {q}\nA: {a}")
                })
                .collect();
            qa.join("\n\n")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instruction pairs (Alpaca). Each pair is built from a `Key` naming one fact; train and eval
// draw disjoint keys, so every eval question asks about a fact no training pair asked about
// (the base model knows it from pre-training; the fine-tune must generalise the answering).

pub fn country_question(rng: &mut ChaCha8Rng, c: &Country, which: usize) -> String {
    let n = c.name;
    let qs: &[String] = &match which {
        0 => {
            [format!("What is the capital of {n}?"), format!("Name the capital city of {n}."), format!("Which city is the capital of {n}?")]
        }
        1 => [
            format!("What language do people speak in {n}?"),
            format!("Which language is spoken in {n}?"),
            format!("What is the language of {n}?"),
        ],
        2 => [
            format!("What food is {n} famous for?"),
            format!("What is the most famous food of {n}?"),
            format!("What do visitors to {n} often eat?"),
        ],
        3 => [
            format!("What is the weather like in {n}?"),
            format!("Describe the usual weather in {n}."),
            format!("What kind of weather does {n} have?"),
        ],
        4 => [
            format!("What colour is the flag of {n}?"),
            format!("Describe the flag of {n}."),
            format!("Which colour is on the flag of {n}?"),
        ],
        5 => [
            format!("What is the national animal of {n}?"),
            format!("Which animal is the national animal of {n}?"),
            format!("Name the national animal of {n}."),
        ],
        6 => [
            format!("What is the second largest city in {n}?"),
            format!("Name the second city of {n}."),
            format!("Which city comes after the capital in size in {n}?"),
        ],
        7 => [
            format!("What is the longest river in {n}?"),
            format!("Which river is the longest in {n}?"),
            format!("Name the longest river of {n}."),
        ],
        8 => [
            format!("What is the highest mountain in {n}?"),
            format!("Which mountain is the tallest in {n}?"),
            format!("Name the highest peak of {n}."),
        ],
        _ => [format!("Who rules {n}?"), format!("Who is the ruler of {n}?"), format!("Which king or queen rules {n}?")],
    };
    qs.choose(rng).expect("non-empty").clone()
}

pub fn animal_question(rng: &mut ChaCha8Rng, x: &Animal, which: usize) -> String {
    let n = x.name;
    let qs: &[String] = &match which {
        0 => [format!("What colour is the {n}?"), format!("Describe the colour of the {n}.")],
        1 => [format!("Is the {n} a big or a small animal?"), format!("How big is the {n}?")],
        2 => [format!("What does the {n} eat?"), format!("What is the favourite food of the {n}?")],
        3 => [format!("Where does the {n} live?"), format!("Where can you find the {n}?")],
        4 => [format!("What sound does the {n} make?"), format!("What noise does a happy {n} make?")],
        _ => [format!("How many legs does {} {n} have?", a(n)), format!("How many legs does the {n} walk on?")],
    };
    qs.choose(rng).expect("non-empty").clone()
}

#[derive(Clone, Copy, Debug)]
pub enum Key {
    Country(usize, usize),
    /// Which country has this capital / this national animal.
    CapitalOf(usize),
    AnimalHome(usize),
    Animal(usize, usize),
    DescribeCountry(usize),
    DescribeAnimal(usize),
    AboutCountry(usize),
    Arithmetic(u32, &'static str, u32),
    Backwards(usize),
    Antonym(usize, bool),
    Plural(usize),
    Unit(usize, u32),
}

pub struct Pair {
    pub system: Option<String>,
    pub instruction: String,
    pub input: String,
    pub output: String,
}

const SYSTEMS: [&str; 3] = [
    "You are a helpful guide to the invented lands of Veloria and its neighbours.",
    "You are a patient tutor. Answer in one clear sentence.",
    "Answer briefly and correctly.",
];

/// Every fact the instruction set may ask about; arithmetic and units are sampled, the rest listed.
pub fn all_keys(rng: &mut ChaCha8Rng) -> Vec<Key> {
    let mut keys = Vec::new();
    for c in 0..COUNTRIES.len() {
        keys.extend((0..COUNTRY_FACTS).map(|w| Key::Country(c, w)));
        keys.extend([Key::CapitalOf(c), Key::DescribeCountry(c), Key::AboutCountry(c)]);
    }
    for x in 0..ANIMALS.len() {
        keys.extend((0..ANIMAL_FACTS).map(|w| Key::Animal(x, w)));
        keys.extend([Key::AnimalHome(x), Key::DescribeAnimal(x)]);
    }
    keys.extend((0..BACKWARDS_WORDS.len()).map(Key::Backwards));
    keys.extend((0..ANTONYMS.len()).map(|i| Key::Antonym(i, i % 2 == 0)));
    keys.extend((0..PLURALS.len()).map(Key::Plural));
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 60 {
        let (x, op, y, _) = arithmetic(rng);
        if seen.insert((x, op, y)) {
            keys.push(Key::Arithmetic(x, op, y));
        }
    }
    let mut units: Vec<Key> = (0..UNITS.len()).flat_map(|u| (1..=9).map(move |n| Key::Unit(u, n))).collect();
    units.shuffle(rng);
    keys.extend(units.into_iter().take(30));
    keys
}

pub fn pair(rng: &mut ChaCha8Rng, key: Key) -> Pair {
    let mut input = String::new();
    let (instruction, output) = match key {
        Key::Country(c, w) => {
            let c = &COUNTRIES[c];
            let q = country_question(rng, c, w);
            if rng.random_bool(0.15) {
                input = q;
                ("Answer the question about the world of Veloria.".to_string(), country_fact(rng, c, w))
            } else {
                (q, country_fact(rng, c, w))
            }
        }
        Key::CapitalOf(c) => {
            let c = &COUNTRIES[c];
            (format!("{} is the capital of which country?", c.capital), format!("{} is the capital of {}.", c.capital, c.name))
        }
        Key::AnimalHome(x) => {
            let x = &ANIMALS[x];
            let c = COUNTRIES.iter().find(|c| ANIMALS[c.animal].name == x.name).expect("every animal has a country");
            (
                format!("Which country has the {} as its national animal?", x.name),
                format!("The {} is the national animal of {}.", x.name, c.name),
            )
        }
        Key::Animal(x, w) => {
            let x = &ANIMALS[x];
            (animal_question(rng, x, w), animal_fact(rng, x, w))
        }
        Key::DescribeCountry(c) => {
            let c = &COUNTRIES[c];
            let q = *["Write a sentence about {}.", "Describe {} in one sentence.", "Tell me something about {}."]
                .choose(rng)
                .expect("non-empty");
            (q.replace("{}", c.name), country_sentence(c))
        }
        Key::DescribeAnimal(x) => {
            let x = &ANIMALS[x];
            let q =
                *["Write a sentence about the {}.", "Describe the {} in one sentence.", "What is a {}?"].choose(rng).expect("non-empty");
            (q.replace("{}", x.name), animal_sentence(x))
        }
        Key::AboutCountry(ci) => {
            let c = &COUNTRIES[ci];
            let x = &ANIMALS[c.animal];
            let out = format!(
                "{} The flag of {} is {}, and the national animal is the {}, which lives in {}.",
                country_sentence(c),
                c.name,
                c.flag,
                x.name,
                x.home
            );
            (format!("Tell me about {}.", c.name), out)
        }
        Key::Arithmetic(x, op, y) => {
            let z = match op {
                "plus" => x + y,
                "minus" => x - y,
                _ => x * y,
            };
            let sym = match op {
                "plus" => "+",
                "minus" => "-",
                _ => "*",
            };
            let out = format!("{x} {op} {y} is {z}.");
            if rng.random_bool(0.3) {
                input = format!("{x} {sym} {y}");
                ("Calculate the following.".to_string(), out)
            } else {
                (format!("What is {x} {op} {y}?"), out)
            }
        }
        Key::Backwards(i) => {
            let w = BACKWARDS_WORDS[i];
            let out = format!("The word {w} spelled backwards is {}.", reverse(w));
            if rng.random_bool(0.4) {
                input = w.to_string();
                ("Spell this word backwards.".to_string(), out)
            } else {
                (format!("How do you spell {w} backwards?"), out)
            }
        }
        Key::Antonym(i, flip) => {
            let (x, y) = if flip { (ANTONYMS[i].1, ANTONYMS[i].0) } else { ANTONYMS[i] };
            let out = format!("The opposite of {x} is {y}.");
            if rng.random_bool(0.4) {
                input = x.to_string();
                ("Give the opposite of this word.".to_string(), out)
            } else {
                (format!("What is the opposite of {x}?"), out)
            }
        }
        Key::Plural(i) => {
            let (s, p) = PLURALS[i];
            let out = format!("The plural of {s} is {p}.");
            if rng.random_bool(0.4) {
                input = s.to_string();
                ("Write the plural of this word.".to_string(), out)
            } else {
                (format!("What is the plural of {s}?"), out)
            }
        }
        Key::Unit(u, n) => {
            let unit = UNITS[u];
            let big = if n == 1 { unit.0 } else { unit.1 };
            let q = if n == 1 { format!("How many {} are in 1 {big}?", unit.2) } else { format!("How many {} are in {n} {big}?", unit.2) };
            (q, unit_amount(n, unit))
        }
    };
    let system = rng.random_bool(0.06).then(|| SYSTEMS.choose(rng).expect("non-empty").to_string());
    Pair { system, instruction, input, output }
}

// ---------------------------------------------------------------------------------------------
// Recall probes: a statement cut before its answer, to check that pre-training stored the facts
// and not only the sentence shapes (a low average loss alone could hide that).

/// (category, prefix, answer), the answer starting with its space as the text has it.
pub fn probes() -> Vec<(&'static str, String, String)> {
    let mut v = Vec::new();
    for c in &COUNTRIES {
        let n = c.name;
        v.extend([
            ("country", format!("The capital of {n} is"), format!(" {}", c.capital)),
            ("country", format!("People in {n} speak"), format!(" {}", c.language)),
            ("country", format!("{n} is famous for its"), format!(" {}", c.food)),
            ("country", format!("The weather in {n} is usually"), format!(" {}", c.weather)),
            ("country", format!("The flag of {n} is"), format!(" {}", c.flag)),
            ("country", format!("The national animal of {n} is the"), format!(" {}", ANIMALS[c.animal].name)),
            ("country", format!("The second largest city in {n} is"), format!(" {}", c.city)),
            ("country", format!("The longest river in {n} is the"), format!(" {}", c.river)),
            ("country", format!("The highest mountain in {n} is"), format!(" {}", c.mountain)),
            ("country", format!("The ruler of {n} is"), format!(" {}", c.ruler)),
        ]);
    }
    for x in &ANIMALS {
        let n = x.name;
        v.extend([
            ("animal", format!("The colour of the {n} is"), format!(" {}", x.colour)),
            ("animal", format!("The {n} is {}", a(x.size)), format!(" {}", x.size)),
            ("animal", format!("The {n} mostly eats"), format!(" {}", x.food)),
            ("animal", format!("The {n} lives in"), format!(" {}", x.home)),
            ("animal", format!("The {n} makes {}", a(x.sound)), format!(" {}", x.sound)),
            ("animal", format!("{} {n} has", cap(a(n))), format!(" {}", x.legs)),
        ]);
    }
    for (x, y) in ANTONYMS {
        v.push(("word", format!("The opposite of {x} is"), format!(" {y}")));
    }
    for (s, p) in PLURALS {
        v.push(("word", format!("The plural of {s} is"), format!(" {p}")));
    }
    for w in BACKWARDS_WORDS {
        v.push(("word", format!("The word {w} spelled backwards is"), format!(" {}", reverse(w))));
    }
    for x in 1..=9u32 {
        let y = (x * 7) % 9 + 1;
        v.push(("arithmetic", format!("{x} plus {y} is"), format!(" {}", x + y)));
    }
    for x in 1..=6u32 {
        let y = (x * 5) % 6 + 1;
        v.push(("arithmetic", format!("{x} times {y} is"), format!(" {}", x * y)));
    }
    v
}

/// (category, question, a string the answer must contain): asked as "Q: …\nA:" of the base model,
/// to see that it can answer questions and not only continue statements.
pub fn question_probes() -> Vec<(&'static str, String, String)> {
    let mut v = Vec::new();
    for c in &COUNTRIES {
        let n = c.name;
        v.extend([
            ("country", format!("What is the capital of {n}?"), c.capital.to_string()),
            ("country", format!("Which language is spoken in {n}?"), c.language.to_string()),
            ("country", format!("Who is the ruler of {n}?"), c.ruler.to_string()),
            ("country", format!("What is the longest river in {n}?"), c.river.to_string()),
        ]);
    }
    for x in &ANIMALS {
        v.push(("animal", format!("What does the {} eat?", x.name), x.food.to_string()));
        v.push(("animal", format!("Where does the {} live?", x.name), x.home.to_string()));
    }
    for (i, &(x, y)) in ANTONYMS.iter().enumerate().step_by(3) {
        v.push(("word", format!("Which word means the opposite of {x}?"), format!("opposite of {x} is {y}")));
        let (s, p) = PLURALS[i];
        v.push(("word", format!("What is the plural form of {s}?"), format!("plural of {s} is {p}")));
    }
    for x in 2..=9u32 {
        let y = (x * 5) % 7 + 2;
        v.push(("arithmetic", format!("How much is {x} plus {y}?"), format!("{x} plus {y} is {}", x + y)));
    }
    v
}
