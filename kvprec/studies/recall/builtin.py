"""A small built-in multi-hop sample for offline runs, written for kvprec (every name, place and fact is invented,
so a model can answer only from the passages, not from memory).

Each record has the HotpotQA layout that :func:`kvprec.studies.recall.data.from_hotpotqa` reads: ``_id``,
``question``, ``answer``, ``type`` (bridge: the answer is reached through an entity the question does not name;
comparison: two entities are compared), ``context`` as [title, [sentences]] per passage, and ``supporting_facts``
as [title, sentence index] pairs. Every question needs two or three supporting passages; the others are
distractors about similar things.
"""
from __future__ import annotations

RECORDS = [
    {
        "_id": "builtin-lighthouse", "type": "bridge",
        "question": "In which town was the engineer who designed Harrow Lighthouse born?",
        "answer": "Dunmere",
        "context": [
            ["Harrow Lighthouse", [
                "Harrow Lighthouse stands on the northern cape of the island of Velsa.",
                " It was designed by the engineer Miriam Castell and first lit in 1872.",
                " The tower is 41 metres tall, and its lamp can be seen from 30 kilometres away on a clear night."]],
            ["Corran Lighthouse", [
                "Corran Lighthouse guards the southern entrance to Velsa harbour.",
                " It was designed by Thomas Elling, who was born in the fishing village of Portcullen.",
                " The light was automated in 1961, and the keeper's cottage is now a small museum."]],
            ["Miriam Castell", [
                "Miriam Castell was a civil engineer who built bridges and lighthouses along the western coast.",
                " She was born in the mill town of Dunmere, where her father repaired weaving looms.",
                " She later taught engineering at the Royal College in Ashford until her retirement."]],
            ["Velsa", [
                "Velsa is a rocky island of about four thousand inhabitants.",
                " A ferry links it to the mainland port of Ashford twice a day.",
                " Most islanders work in fishing, sheep farming or the summer tourist trade."]],
            ["Dunmere Mill", [
                "Dunmere Mill was the largest wool mill in the valley and employed six hundred workers at its peak.",
                " It closed in 1934 after a fire destroyed the dyeing house."]],
        ],
        "supporting_facts": [["Harrow Lighthouse", 1], ["Miriam Castell", 1]],
    },
    {
        "_id": "builtin-album", "type": "bridge",
        "question": "In which city was the band that recorded the album Glass Orchard formed?",
        "answer": "Marrowick",
        "context": [
            ["The Salt Choir", [
                "The Salt Choir is a folk group formed in Ellingford in 1992.",
                " Their best-known album, Tidewater, was recorded in a disused church.",
                " The group toured with a brass section for most of the following decade."]],
            ["Glass Orchard", [
                "Glass Orchard is the third studio album by The Lanterns of Ysel, released in 1998.",
                " It was recorded over six weeks in a farmhouse studio and produced by Henrik Aal.",
                " Critics praised its string arrangements, and it sold well in northern Europe."]],
            ["Henrik Aal", [
                "Henrik Aal is a record producer born in Tessing.",
                " Besides Glass Orchard he produced two albums by The Salt Choir and a film soundtrack."]],
            ["The Lanterns of Ysel", [
                "The Lanterns of Ysel are a rock band formed in the harbour city of Marrowick in 1989.",
                " The band was founded by the singer Petra Vand and the drummer Ole Brisk.",
                " They have released seven studio albums and still perform every winter."]],
            ["Marrowick", [
                "Marrowick is a port city known for its shipyards and its autumn music festival.",
                " Its old town has narrow streets lined with timber warehouses."]],
        ],
        "supporting_facts": [["Glass Orchard", 0], ["The Lanterns of Ysel", 0]],
    },
    {
        "_id": "builtin-rivers", "type": "comparison",
        "question": "Which river is longer, the Ambel or the Siskin?",
        "answer": "the Ambel",
        "context": [
            ["Ambel (river)", [
                "The Ambel is a river that rises in the Corvine Hills and flows east to the Grey Sea.",
                " It is 412 kilometres long and is navigable by barges for most of its course.",
                " Several large towns, including Fenbury and Oster, grew up along its banks."]],
            ["Oster", [
                "Oster is a market town on the Ambel, famous for its stone bridge of nine arches.",
                " The town holds a cattle fair every spring."]],
            ["Siskin (river)", [
                "The Siskin is a river in the western lowlands that joins the Ambel near Fenbury.",
                " It is 287 kilometres long and floods most winters.",
                " Its water meadows are home to rare wading birds."]],
            ["Tarn (river)", [
                "The Tarn is a short mountain river of 96 kilometres with many waterfalls.",
                " It powers three small hydroelectric stations."]],
            ["Corvine Hills", [
                "The Corvine Hills are a range of low limestone hills covered in beech forest.",
                " Their highest point, Crow Top, reaches 640 metres."]],
        ],
        "supporting_facts": [["Ambel (river)", 1], ["Siskin (river)", 1]],
    },
    {
        "_id": "builtin-clock", "type": "bridge",
        "question": "What language is spoken in the country where the inventor of the Tellurian clock was born?",
        "answer": "Havian",
        "context": [
            ["Tellurian clock", [
                "The Tellurian clock is a mechanical clock that also shows the phases of the moon and the tides.",
                " It was invented in 1741 by the clockmaker Oskar Brandt.",
                " Only five examples survive, one of them in the Orvell Museum of Science."]],
            ["Anselm Kray", [
                "Anselm Kray was a clockmaker from Pellonia who built the first pocket chronometer.",
                " He corresponded with many instrument makers of his time."]],
            ["Oskar Brandt", [
                "Oskar Brandt was a clockmaker and astronomer.",
                " He was born in Nordhavia, in the coastal town of Skellin, and trained in his uncle's workshop.",
                " He spent his later years building telescopes for wealthy patrons."]],
            ["Nordhavia", [
                "Nordhavia is a small northern country with a long coastline and many islands.",
                " Its official language is Havian, although many people also speak Pellonian.",
                " The capital, Ristad, is the largest port in the region."]],
            ["Pellonia", [
                "Pellonia is a country of mountains and lakes to the south of Nordhavia.",
                " Its official language is Pellonian."]],
        ],
        "supporting_facts": [["Tellurian clock", 1], ["Oskar Brandt", 1], ["Nordhavia", 1]],
    },
    {
        "_id": "builtin-university", "type": "bridge",
        "question": "In which city is the university that the founder of Quillstone Foods attended?",
        "answer": "Crestfield",
        "context": [
            ["Quillstone Foods", [
                "Quillstone Foods is a company that makes oat biscuits and breakfast cereals.",
                " It was founded in 1968 by Ada Merrow in a rented bakery.",
                " Today it employs about two thousand people in four factories."]],
            ["Ada Merrow", [
                "Ada Merrow was a businesswoman and baker.",
                " She studied chemistry at Halden University before working in a flour laboratory.",
                " She led Quillstone Foods for thirty years."]],
            ["Halden University", [
                "Halden University is a public university located in the city of Crestfield.",
                " It was founded in 1851 and is known for its agricultural sciences."]],
            ["Brindle University", [
                "Brindle University is a private university in the town of Wexley.",
                " It has a famous rowing club and a medieval library."]],
            ["Crestfield", [
                "Crestfield is an inland city built on both sides of the Siskin river.",
                " It has a cathedral, two theatres and a large covered market."]],
        ],
        "supporting_facts": [["Quillstone Foods", 1], ["Ada Merrow", 1], ["Halden University", 0]],
    },
    {
        "_id": "builtin-museums", "type": "comparison",
        "question": "Which was founded first, the Orvell Museum of Science or the Kessa Art Gallery?",
        "answer": "the Orvell Museum of Science",
        "context": [
            ["Kessa Art Gallery", [
                "The Kessa Art Gallery holds a collection of landscape paintings and modern sculpture.",
                " It was founded in 1921 by the painter Lidia Kessa, who donated her own works.",
                " The gallery moved to a former railway station in 1987."]],
            ["Lidia Kessa", [
                "Lidia Kessa was a landscape painter known for her winter scenes.",
                " She taught at the academy of fine arts for twenty years."]],
            ["Orvell Museum of Science", [
                "The Orvell Museum of Science displays scientific instruments, clocks and early engines.",
                " It was founded in 1903 with the collection of the engineer Paul Orvell.",
                " Its most visited exhibit is a working steam pump."]],
            ["Paul Orvell", [
                "Paul Orvell was an engineer who designed pumps for coal mines.",
                " He collected instruments all his life and left them to the city."]],
            ["Museum Quarter", [
                "The Museum Quarter is the part of the city where most of its museums stand.",
                " It was laid out in the 1890s around a park with a lake."]],
        ],
        "supporting_facts": [["Kessa Art Gallery", 1], ["Orvell Museum of Science", 1]],
    },
    {
        "_id": "builtin-ship", "type": "bridge",
        "question": "What was the name of the ship commanded by the captain who discovered Fennick Island?",
        "answer": "the Merriweather",
        "context": [
            ["Fennick Island", [
                "Fennick Island is an uninhabited island with large colonies of seabirds.",
                " It was discovered in 1791 by Captain Rosa Idler during a survey of the eastern reefs.",
                " The island is now a nature reserve."]],
            ["Rosa Idler", [
                "Rosa Idler was a naval officer and explorer.",
                " She commanded the survey ship Merriweather for eleven years and mapped hundreds of reefs.",
                " Her charts were used by sailors for more than a century."]],
            ["Jonas Wray", [
                "Jonas Wray was a captain who commanded the frigate Calloway.",
                " He discovered the Wray Shoals in 1802."]],
            ["Merriweather (ship)", [
                "The Merriweather was a three-masted survey ship launched in 1784.",
                " She carried a crew of sixty and a small observatory on deck."]],
            ["Eastern reefs", [
                "The eastern reefs are a chain of coral reefs that stretch for two hundred kilometres.",
                " Many ships were wrecked there before they were charted."]],
        ],
        "supporting_facts": [["Fennick Island", 1], ["Rosa Idler", 1]],
    },
    {
        "_id": "builtin-marathon", "type": "bridge",
        "question": "Which national team did the winner of the 1974 Calder Marathon later coach?",
        "answer": "the national rowing team",
        "context": [
            ["Calder Marathon", [
                "The Calder Marathon is a road race held every autumn along the Calder valley.",
                " The 1974 race was won by Iben Soll in a course record time.",
                " The 1975 race was won by Marten Oddvar."]],
            ["Iben Soll", [
                "Iben Soll is a former long-distance runner.",
                " After retiring from running she became the coach of the national rowing team.",
                " She also wrote a book about training at altitude."]],
            ["Marten Oddvar", [
                "Marten Oddvar is a former marathon runner who later coached the national cycling team.",
                " He won two medals at the regional games."]],
            ["Calder valley", [
                "The Calder valley is a long green valley with many small farms and old stone villages.",
                " A railway runs along the valley floor."]],
            ["National rowing team", [
                "The national rowing team trains on a lake near the capital.",
                " It won its first international title in 1988."]],
        ],
        "supporting_facts": [["Calder Marathon", 1], ["Iben Soll", 1]],
    },
]
