"""Writes the generated part of this corpus, stories-1.txt ... stories-5.txt: simple, varied short stories.

Every sentence pattern and word list below was written for plainlm, so the stories are as free as this file (see
README.md). The output is deterministic: run `python data/pretrain/generate_stories.py` to rewrite the same files.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).parent
FILES = 5
BYTES_PER_FILE = 80_000


def words(text: str) -> list[str]:
    return text.split()


def phrases(text: str) -> list[str]:
    return text.split(", ")


GIRLS = words("Lily Mia Anna Zoe Ella Ruby Nora Ivy Rosa Maya Lucy Sara Emma Hana Clara Jade Tess Amy Nina Kate")
BOYS = words("Tom Ben Sam Max Leo Jack Finn Noah Oscar Omar Hugo Theo Eli Ravi Tim Luke Adam Kai Jonah Pete")
ANIMALS = words("rabbit fox bear duck mouse cat dog owl frog squirrel turtle hedgehog goat pig lamb puppy kitten")
ANIMAL_LOOKS = words("little small fluffy brown gray spotted white curious sleepy young")
ADULTS = [("Mom", "she"), ("Dad", "he"), ("Grandma", "she"), ("Grandpa", "he"), ("Aunt May", "she")]
TOYS = phrases(
    "red ball, blue kite, wooden train, teddy bear, toy boat, yellow truck, rag doll, tin drum, little car, "
    "green yo-yo, paper crown, stuffed bunny"
)
HIDING_PLACES = [
    ("under the bed", "it had rolled there during the night"),
    ("behind the sofa", "the cat had pushed it there while playing"),
    ("in the garden", "it had been left there after the picnic"),
    ("inside the toy box", "it had been there all along, under the blocks"),
    ("in the laundry basket", "it had been picked up with the blankets"),
    ("on the kitchen shelf", "Dad had put it there to keep it safe"),
    ("in the dog's bed", "the dog had borrowed it for a nap"),
    ("under a pile of leaves", "the wind had covered it up"),
]
SEARCH_PLACES = phrases(
    "in the kitchen, in the closet, under the table, behind the door, in the car, on the porch, in the bath"
)
PLACES = {
    "the beach": ["shells on the sand", "a crab running sideways", "big waves", "a boat far away", "seagulls"],
    "the farm": ["cows in the field", "a red barn", "baby chicks", "a tractor", "a horse eating hay"],
    "the zoo": ["a tall giraffe", "two sleepy lions", "a monkey on a rope", "a big gray elephant", "penguins"],
    "the park": ["ducks on the pond", "a long slide", "kids on the swings", "a man selling balloons", "tall trees"],
    "the market": ["piles of apples", "fresh bread", "bright flowers", "a man playing a fiddle", "jars of honey"],
    "the forest": ["tall pine trees", "a quiet stream", "mushrooms by a log", "a deer", "a woodpecker"],
    "the mountain": ["a cold lake", "rocks and snow", "an eagle in the sky", "a narrow path", "a wooden bridge"],
    "the library": ["shelves of books", "a reading corner", "a fish tank", "a map of the world", "picture books"],
}
FAVORITE_PARTS = [
    "the best part was the snack they shared at the end",
    "the best part was laughing together on the way home",
    "the best part was a surprise at the very end",
    "the best part was the long ride there, singing songs",
]
FOODS = {
    "cookies": ["flour", "butter", "sugar", "an egg"],
    "pancakes": ["flour", "milk", "eggs", "a pinch of salt"],
    "bread": ["flour", "water", "yeast", "salt"],
    "soup": ["carrots", "potatoes", "onions", "water"],
    "a fruit salad": ["apples", "bananas", "grapes", "oranges"],
    "a cake": ["flour", "eggs", "sugar", "milk"],
    "muffins": ["flour", "blueberries", "milk", "sugar"],
}
COOKING_MISTAKES = [
    ("used salt instead of sugar", "tasted the batter and made a funny face", "started again with the right jar"),
    ("dropped an egg on the floor", "laughed and cleaned it up", "took a new egg, more carefully this time"),
    ("forgot to set a timer", "smelled something burning", "saved most of it and trimmed the dark edges"),
    ("spilled the milk", "wiped the table with a towel", "poured a little more, slowly"),
]
BUILD_THINGS = [  # (what, from what, how it failed, how they fixed it, how it ended)
    (
        "a tower",
        "blocks",
        "it was too thin at the bottom, and it fell over",
        "made the bottom wide and strong",
        "the tower stood tall and did not wobble",
    ),
    (
        "a bird house",
        "wood and nails",
        "the roof kept sliding off",
        "added a small piece of wood to hold it",
        "a little blue bird came to look at the bird house",
    ),
    (
        "a sand castle",
        "wet sand",
        "the sand dried in the sun and fell apart",
        "brought water from the sea in a bucket",
        "the castle had four towers and a wall around it",
    ),
    (
        "a fort",
        "chairs and blankets",
        "the blanket kept falling down",
        "held it up with clothespins",
        "the fort was big enough for two friends and a flashlight",
    ),
    (
        "a boat",
        "folded paper",
        "it got wet and sank in the puddle",
        "folded a new one with thicker paper",
        "the boat sailed all the way across the puddle",
    ),
    (
        "a snowman",
        "snow",
        "the head was too big and rolled off",
        "made the head smaller and pressed it down",
        "the snowman wore a hat and a carrot nose",
    ),
]
SKILLS = [
    ("ride a bike", "wobbled and fell on the grass", "rode all the way to the end of the street"),
    ("swim", "swallowed some water and coughed", "swam across the pool by {him}self"),
    ("whistle", "only made a soft puff of air", "whistled a happy little tune"),
    ("tie {his} shoes", "made a knot that came undone", "tied a neat bow on both shoes"),
    ("jump rope", "tripped on the rope again and again", "jumped twenty times without stopping"),
    ("read a whole book", "got stuck on the long words", "read the last page out loud"),
    ("catch a ball", "closed {his} eyes every time the ball came", "caught the ball with both hands"),
]
TROUBLES = [
    ("a kitten", "stuck high up in a tree", "called a neighbor with a ladder", "carried it down safely"),
    ("a bird", "with a hurt wing on the path", "made a soft bed in a shoe box", "let it fly away a week later"),
    ("a puppy", "lost and crying by the gate", "read the name on its collar", "took it back to its family"),
    ("a turtle", "on its back in the sun", "gently turned it over", "watched it walk slowly to the pond"),
    ("a duckling", "left behind by its mother", "followed the quacking sound", "brought it back to the pond"),
]
NIGHT_SOUNDS = [
    ("a tapping sound on the window", "a branch moving in the wind"),
    ("a scratching noise under the bed", "the cat playing with a sock"),
    ("a loud creak in the hall", "the old floor cooling down for the night"),
    ("a soft hooting outside", "an owl sitting on the fence"),
    ("a dripping sound in the dark", "the kitchen tap that was not closed"),
]
WEATHER = [
    ("rain", "The sky turned gray and rain began to fall"),
    ("wind", "A strong wind began to blow the leaves around"),
    ("snow", "Big white flakes of snow began to fall"),
    ("storm", "Dark clouds rolled in and thunder rumbled far away"),
]
OUTDOOR = ["play in the park", "fly a kite", "go to the lake", "have a picnic", "ride bikes", "play ball outside"]
INDOOR = [
    ("build a fort with pillows", "It was the best fort ever"),
    ("paint pictures", "Soon the table was full of bright paintings"),
    ("bake cookies", "The house smelled warm and sweet"),
    ("play a board game", "They played until it was time for dinner"),
    ("read stories by the window", "They watched the weather and read page after page"),
]
FEELINGS_GOOD = ["happy", "proud", "glad", "excited", "warm inside"]
FEELINGS_BAD = ["sad", "worried", "upset", "grumpy", "lonely"]
DAYS = ["One sunny morning", "One day", "On a cold afternoon", "Last summer", "One Saturday", "Early one morning"]
MORALS = [
    "Sharing makes everything more fun.",
    "Friends help each other.",
    "Trying again is how we learn.",
    "Being kind is always a good choice.",
    "Asking for help is nothing to be ashamed of.",
    "A little patience goes a long way.",
]


class Hero:
    """A story's character: a name and the pronouns that go with it."""

    def __init__(self, rng: random.Random, avoid: str = ""):
        self.is_girl = rng.random() < 0.5
        names = [n for n in (GIRLS if self.is_girl else BOYS) if n != avoid]
        self.name = rng.choice(names)
        if rng.random() < 0.3:
            self.intro = f"a {rng.choice(ANIMAL_LOOKS)} {rng.choice(ANIMALS)} named {self.name}"
        else:
            look = rng.choice(["little", "young", "kind", "curious", "cheerful"])
            self.intro = f"a {look} {'girl' if self.is_girl else 'boy'} named {self.name}"
        self.he, self.him, self.his = ("she", "her", "her") if self.is_girl else ("he", "him", "his")

    def fill(self, text: str) -> str:
        return text.format(he=self.he, him=self.him, his=self.his, name=self.name)


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def lost_toy(rng: random.Random) -> str:
    hero = Hero(rng)
    friend = Hero(rng, avoid=hero.name)
    toy = rng.choice(TOYS)
    place, reason = rng.choice(HIDING_PLACES)
    searched = rng.sample(SEARCH_PLACES, 2)
    return (
        f"Once there was {hero.intro}. {cap(hero.he)} had a {toy} that {hero.he} loved very much. "
        f"{cap(hero.he)} took it everywhere.\n"
        f"{rng.choice(DAYS)}, {hero.name} could not find the {toy}. {cap(hero.he)} looked {searched[0]}. "
        f"{cap(hero.he)} looked {searched[1]}. It was not there. {hero.name} felt {rng.choice(FEELINGS_BAD)}.\n"
        f'{hero.name}\'s friend {friend.name} came by. "Why do you look so {rng.choice(FEELINGS_BAD)}?" '
        f'{friend.he} asked. "I lost my {toy}," said {hero.name}. "I will help you look," said {friend.name}.\n'
        f"They searched together, and at last they found it {place}. {cap(reason)}. "
        f"{hero.name} hugged the {toy} and thanked {friend.name}. {rng.choice(MORALS)}"
    )


def new_friend(rng: random.Random) -> str:
    hero = Hero(rng)
    other = Hero(rng, avoid=hero.name)
    place = rng.choice(list(PLACES))
    thing = rng.choice(PLACES[place])
    game = rng.choice(["tag", "hide and seek", "catch", "a game of pretend", "a race to the big tree"])
    return (
        f"{rng.choice(DAYS)}, {hero.intro} went to {place}. {cap(hero.he)} did not know anyone there, "
        f"and {hero.he} felt a little {rng.choice(FEELINGS_BAD)}.\n"
        f"Then {hero.he} saw {other.intro}, who was looking at {thing}. {hero.name} wanted to say hello, "
        f"but {hero.he} was shy. {cap(hero.he)} took a deep breath and walked over.\n"
        f'"Hello, I am {hero.name}," {hero.he} said. "Do you want to play {game}?" '
        f'{other.name} smiled. "Yes, I would like that very much!"\n'
        f"They played {game} until the sun went down. When it was time to go home, they promised to meet "
        f"again the next day. {hero.name} felt {rng.choice(FEELINGS_GOOD)}. It is good to be brave and say hello."
    )


def weather_day(rng: random.Random) -> str:
    hero = Hero(rng)
    adult, _ = rng.choice(ADULTS)
    outdoor = rng.choice(OUTDOOR)
    weather, sentence = rng.choice(WEATHER)
    indoor, ending = rng.choice(INDOOR)
    return (
        f"{rng.choice(DAYS)}, {hero.intro} wanted to {outdoor}. {cap(hero.he)} put on {hero.his} shoes "
        f"and ran to the door.\n{sentence}. {hero.name} could not go out in the {weather}. "
        f"{cap(hero.he)} sat by the window and felt {rng.choice(FEELINGS_BAD)}.\n"
        f'{adult} saw {hero.him} and said, "We cannot {outdoor} today, but we can {indoor}." '
        f"{hero.name} thought about it and nodded.\n"
        f"So they decided to {indoor}. {ending}. When the {weather} stopped, {hero.name} was almost sorry. "
        f'"Staying in was fun too," {hero.he} said.'
    )


def cooking(rng: random.Random) -> str:
    hero = Hero(rng)
    adult, adult_he = rng.choice(ADULTS)
    food = rng.choice(list(FOODS))
    items = FOODS[food]
    mistake, reaction, fix = rng.choice(COOKING_MISTAKES)
    was, it, they = ("were", "them", "they") if food.endswith("s") else ("was", "it", "it")
    sharer = rng.choice(["the neighbors", "the whole family", "friends from school", "the old man next door"])
    return (
        f"{rng.choice(DAYS)}, {hero.name} and {adult} decided to make {food}. "
        f"They put on aprons and washed their hands.\n"
        f"First they got out {items[0]}, {items[1]}, {items[2]} and {items[3]}. "
        f"{hero.name} did the mixing, and {adult} did the measuring.\n"
        f"But {hero.name} {mistake}. {cap(adult_he)} {reaction}. Then {adult_he} {fix}. "
        f'"Everyone makes mistakes in the kitchen," {adult} said.\n'
        f"When the {food.removeprefix('a ')} {was} ready, {they} {was} {rng.choice(['delicious', 'warm', 'perfect'])}. "
        f"They shared {it} with {sharer}, and everyone asked for more."
    )


def building(rng: random.Random) -> str:
    hero = Hero(rng)
    thing, material, problem, fix, ending = rng.choice(BUILD_THINGS)
    helper = Hero(rng, avoid=hero.name)
    return (
        f"{rng.choice(DAYS)}, {hero.intro} wanted to build {thing} out of {material}. "
        f"{cap(hero.he)} worked hard all morning.\n"
        f"But {problem}. {hero.name} felt {rng.choice(FEELINGS_BAD)} "
        f"and wanted to give up.\n"
        f'{helper.name} came to look. "Let us try again together," {helper.he} said. '
        f"This time they {fix}.\n"
        f"When they were done, {ending}. {hero.name} and {helper.name} felt "
        f"{rng.choice(FEELINGS_GOOD)}. {rng.choice(MORALS)}"
    )


def trip(rng: random.Random) -> str:
    hero = Hero(rng)
    place = rng.choice(list(PLACES))
    seen = rng.sample(PLACES[place], 3)
    return (
        f"{rng.choice(DAYS)}, {hero.name} and {hero.his} family went to {place}. "
        f"{hero.name} had never been there before.\n"
        f"First {hero.he} saw {seen[0]}. Then {hero.he} saw {seen[1]}. "
        f'"Look!" {hero.he} shouted, and pointed at {seen[2]}.\n'
        f"They stayed all day. {hero.name} said that {rng.choice(FAVORITE_PARTS)}. "
        f"That night {hero.he} drew a picture of {seen[0]} before going to sleep."
    )


def helping(rng: random.Random) -> str:
    hero = Hero(rng)
    animal, trouble, action, ending = rng.choice(TROUBLES)
    return (
        f"{rng.choice(DAYS)}, {hero.intro} was walking home when {hero.he} found {animal} {trouble}.\n"
        f"{hero.name} did not walk away. {cap(hero.he)} stopped and thought about what to do. "
        f"Then {hero.he} {action}.\n"
        f"In the end they {ending}. {hero.name} felt {rng.choice(FEELINGS_GOOD)}. "
        f"Helping others is a way of being brave."
    ).replace("In the end they let", f"In the end {hero.name} let")


def learning(rng: random.Random) -> str:
    hero = Hero(rng)
    skill, failure, success = (hero.fill(part) for part in rng.choice(SKILLS))
    coach, _ = rng.choice(ADULTS)
    days = rng.choice(["three days", "a whole week", "many days", "two weeks"])
    return (
        f"{hero.name} wanted to learn to {skill}. The first time {hero.he} tried, {hero.he} {failure}.\n"
        f'"I will never learn," said {hero.name}. "Yes, you will," said {coach}. '
        f'"Everyone starts at the beginning. Try a little every day."\n'
        f"So {hero.name} practiced for {days}. Some days were good and some days were hard. "
        f"{coach} watched and cheered.\n"
        f"Then one morning {hero.name} {success}. {cap(hero.he)} was so {rng.choice(FEELINGS_GOOD)}! "
        f"{rng.choice(MORALS)}"
    )


def sharing(rng: random.Random) -> str:
    a = Hero(rng)
    b = Hero(rng, avoid=a.name)
    toy = rng.choice(TOYS)
    return (
        f"{a.name} and {b.name} were playing together. Both of them wanted the {toy} at the same time.\n"
        f'"It is mine!" said {a.name}. "No, I had it first!" said {b.name}. '
        f"They pulled and pulled, and nobody was having fun anymore.\n"
        f'Then {b.name} had an idea. "What if we take turns? You play first, and then it is my turn." '
        f"{a.name} thought it was a good idea.\n"
        f"They took turns with the {toy}, and then they found a way to play with it together. "
        f"It was more fun than playing alone. {rng.choice(MORALS)}"
    )


def night_noise(rng: random.Random) -> str:
    hero = Hero(rng)
    sound, source = rng.choice(NIGHT_SOUNDS)
    adult, _ = rng.choice(ADULTS)
    return (
        f"It was late at night, and {hero.name} was in bed. The room was dark and quiet.\n"
        f"Suddenly {hero.he} heard {sound}. {hero.name} pulled the blanket up to {hero.his} nose. "
        f"{cap(hero.he)} felt {rng.choice(['scared', 'worried', 'nervous'])}.\n"
        f"{cap(hero.he)} called for {adult}, who came with a small lamp. Together they looked, "
        f"and they found that it was only {source}.\n"
        f'"See?" said {adult}. "There is nothing to be afraid of." {hero.name} smiled, closed '
        f"{hero.his} eyes, and soon {hero.he} was fast asleep."
    )


STORIES = [lost_toy, new_friend, weather_day, cooking, building, trip, helping, learning, sharing, night_noise]


def main() -> None:
    for i in range(1, FILES + 1):
        rng = random.Random(i)
        stories: list[str] = []
        while sum(len(s) + 2 for s in stories) < BYTES_PER_FILE:
            stories.append(rng.choice(STORIES)(rng))
        (HERE / f"stories-{i}.txt").write_text("\n\n".join(stories) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
